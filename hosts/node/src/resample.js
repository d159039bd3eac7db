// Pillow-compatible image resizing for 8-bit images (`Image.resize(size, resample=...)` with no
// box and no reducing_gap), written from the algorithm Pillow documents and implements in
// libImaging/Resample.c:
//
//   * separable convolution, horizontal pass first, then vertical; the intermediate image is
//     rounded to 8 bits;
//   * per output pixel, the filter is centred at `(x + 0.5) * scale`; its support is stretched by
//     `max(scale, 1)` when downscaling (antialiasing), the window bounds are rounded with
//     `trunc(center -/+ support + 0.5)` and clamped to the image, and the weights are normalised
//     to sum to 1 (in doubles);
//   * weights are then turned into fixed point with 22 fractional bits (`PRECISION_BITS = 32 - 8 - 2`),
//     rounded half away from zero; each sum starts at `1 << 21` (rounding) and the result is
//     `clamp(sum >> 22, 0, 255)`;
//   * the horizontal pass only computes the source rows the vertical pass reads.
//
// With these details the output is bit-identical to Pillow's for nearest-free filters (checked
// against Pillow in test/preprocess.test.js and tools/node_parity.py). `nearest` follows Pillow's
// affine nearest-neighbour rule (source index floor((x + 0.5) * scale)).

import { ConfigError } from './errors.js';

const PRECISION_BITS = 32 - 8 - 2;
const HALF = 1 << (PRECISION_BITS - 1);

function bicubic(x) {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

function bilinear(x) {
  if (x < 0) x = -x;
  return x < 1 ? 1 - x : 0;
}

function box(x) {
  return x > -0.5 && x <= 0.5 ? 1 : 0;
}

function hamming(x) {
  if (x < 0) x = -x;
  if (x === 0) return 1;
  if (x >= 1) return 0;
  x *= Math.PI;
  // Pillow multiplies by float constants (0.54f, 0.46f): keep their float32 values.
  return (Math.sin(x) / x) * (Math.fround(0.54) + Math.fround(0.46) * Math.cos(x));
}

function sinc(x) {
  if (x === 0) return 1;
  x *= Math.PI;
  return Math.sin(x) / x;
}

function lanczos(x) {
  return x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0;
}

/** Convolution filters by the names `preprocess.resample` uses, with their support. */
export const FILTERS = {
  box: { fn: box, support: 0.5 },
  bilinear: { fn: bilinear, support: 1 },
  hamming: { fn: hamming, support: 1 },
  bicubic: { fn: bicubic, support: 2 },
  lanczos: { fn: lanczos, support: 3 },
};

/** The resampling filter names this module implements. */
export const RESAMPLE_NAMES = ['nearest', ...Object.keys(FILTERS)];

/**
 * Window bounds and fixed-point weights for resizing an axis of `inSize` pixels to `outSize`.
 * Returns { ksize, bounds: Int32Array [outSize * 2] (first source index, count), weights: Int32Array }.
 */
export function axisCoefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filter.support * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  const inv = 1 / filterScale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      const v = filter.fn((x + xmin - center + 0.5) * inv);
      w[x] = v;
      total += v;
    }
    for (let x = 0; x < xmax; x++) {
      const v = total !== 0 ? w[x] / total : w[x];
      // fixed point, rounded half away from zero (C's (int) truncates toward zero)
      weights[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * (1 << PRECISION_BITS))
        : Math.trunc(0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, weights };
}

function clip8(sum) {
  const v = sum >> PRECISION_BITS; // arithmetic shift: floor division, as in C on int
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

function nearest(src, width, height, channels, outW, outH) {
  const out = new Uint8Array(outW * outH * channels);
  const sx = width / outW;
  const sy = height / outH;
  for (let y = 0; y < outH; y++) {
    const yi = Math.min(height - 1, Math.floor((y + 0.5) * sy));
    for (let x = 0; x < outW; x++) {
      const xi = Math.min(width - 1, Math.floor((x + 0.5) * sx));
      for (let c = 0; c < channels; c++) out[(y * outW + x) * channels + c] = src[(yi * width + xi) * channels + c];
    }
  }
  return out;
}

/**
 * Resize interleaved 8-bit pixels (`channels` per pixel, row-major) like Pillow's
 * `Image.resize((outW, outH), resample=name)`. Returns a new Uint8Array.
 */
export function resize(src, width, height, channels, outW, outH, name) {
  const key = typeof name === 'string' ? name.toLowerCase().trim() : name;
  if (!RESAMPLE_NAMES.includes(key)) {
    throw new ConfigError(
      `unknown resample filter ${JSON.stringify(name)} in the manifest's preprocess.resample; this host implements ` +
        `${RESAMPLE_NAMES.join(', ')}`,
    );
  }
  if (outW === width && outH === height) return Uint8Array.from(src);
  if (key === 'nearest') return nearest(src, width, height, channels, outW, outH);
  const filter = FILTERS[key];
  const needH = outW !== width;
  const needV = outH !== height;
  const vert = axisCoefficients(height, outH, filter);
  let img = src;
  let imgW = width;
  let rowOffset = 0;
  if (needH) {
    const first = vert.bounds[0];
    const last = vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1];
    const rows = needV ? last - first : height;
    const start = needV ? first : 0;
    const hor = axisCoefficients(width, outW, filter);
    const tmp = new Uint8Array(outW * rows * channels);
    const sums = new Int32Array(channels);
    for (let y = 0; y < rows; y++) {
      const rowBase = (y + start) * width;
      for (let xx = 0; xx < outW; xx++) {
        const xmin = hor.bounds[xx * 2];
        const n = hor.bounds[xx * 2 + 1];
        const kOff = xx * hor.ksize;
        sums.fill(HALF);
        for (let x = 0; x < n; x++) {
          const k = hor.weights[kOff + x];
          const p = (rowBase + xmin + x) * channels;
          for (let c = 0; c < channels; c++) sums[c] += src[p + c] * k;
        }
        const o = (y * outW + xx) * channels;
        for (let c = 0; c < channels; c++) tmp[o + c] = clip8(sums[c]);
      }
    }
    img = tmp;
    imgW = outW;
    rowOffset = needV ? first : 0;
  }
  if (!needV) return img === src ? Uint8Array.from(src) : img;
  const out = new Uint8Array(imgW * outH * channels);
  const sums = new Int32Array(channels);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = vert.bounds[yy * 2] - rowOffset;
    const n = vert.bounds[yy * 2 + 1];
    const kOff = yy * vert.ksize;
    for (let x = 0; x < imgW; x++) {
      sums.fill(HALF);
      for (let y = 0; y < n; y++) {
        const k = vert.weights[kOff + y];
        const p = ((ymin + y) * imgW + x) * channels;
        for (let c = 0; c < channels; c++) sums[c] += img[p + c] * k;
      }
      const o = (yy * imgW + x) * channels;
      for (let c = 0; c < channels; c++) out[o + c] = clip8(sums[c]);
    }
  }
  return out;
}

/** The size of a `width` x `height` image scaled so its long side is `size` (aspect kept, each side
 * rounded half up, at least 1): maven_edge.core.preprocess.fitted_size, the host contract's `fitted_size`. */
export function fittedSize(width, height, size) {
  const long = Math.max(width, height);
  const side = (n) => Math.max(1, Math.floor((2 * n * size + long) / (2 * long)));
  return [side(width), side(height)];
}

/**
 * Resize so the long side is `size`, then centre the result on a `size` x `size` canvas of `fill`
 * (host contract version 2, `resize_then_pad`): the picture of padding to a square first and
 * resizing after, without a canvas that grows with the long side squared. Returns the
 * interleaved 8-bit pixels of the square.
 */
export function fitToSquare(src, width, height, channels, size, fill, name) {
  const [fw, fh] = fittedSize(width, height, size);
  const fitted = resize(src, width, height, channels, fw, fh, name);
  if (fw === size && fh === size) return fitted;
  const out = new Uint8Array(size * size * channels);
  for (let i = 0; i < size * size; i++) out.set(fill, i * channels);
  const x0 = Math.floor((size - fw) / 2);
  const y0 = Math.floor((size - fh) / 2);
  for (let y = 0; y < fh; y++) {
    out.set(fitted.subarray(y * fw * channels, (y + 1) * fw * channels), ((y + y0) * size + x0) * channels);
  }
  return out;
}
