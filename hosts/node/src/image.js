// Image decoding and preprocessing as the manifest's `preprocess` and `host.preprocess` say
// (docs/hosts.md "Images"): decode (sharp: libvips with libjpeg(-turbo)/libpng, bit-identical to
// Pillow's decoders on baseline and progressive JPEG and on PNG), EXIF orientation applied, ICC
// profile ignored, alpha composited over `alpha_background` with integer rounding, 16-bit
// colour reduced to its high byte and 16-bit grey stretched by its actual range (Pillow's and
// maven_edge.core.preprocess's policies), then resize so the long side fits the square and centre
// it on `pad_color` (host contract version 2), with Pillow's resampling (resample.js), rescale and
// normalise in float32, NCHW.

import fs from 'node:fs/promises';

import sharp from 'sharp';

import { ConfigError, ImageError } from './errors.js';
import { fitToSquare, resize } from './resample.js';

/** What an image may be; everything outside is refused with an ImageError (as in Python's ImageLimits). */
export const DEFAULT_IMAGE_LIMITS = Object.freeze({
  maxPixels: 40_000_000,
  maxBytes: 64 * 1024 * 1024,
  minSide: 1,
  maxAspectRatio: 50,
  formats: Object.freeze(['png', 'jpeg', 'gif', 'webp', 'tiff']),
});

function label(source, name) {
  if (name && typeof source === 'string') return `${name} (${JSON.stringify(source)})`;
  if (name) return name;
  if (typeof source === 'string') return `image ${JSON.stringify(source)}`;
  return `image bytes (${source?.length ?? 0} bytes)`;
}

async function readSource(source, what, limits) {
  if (typeof source === 'string') {
    if (/^(https?|ftp):\/\//i.test(source)) {
      throw new ImageError(`${what}: URLs are not fetched; download the image and pass the local path`);
    }
    let stat;
    try {
      stat = await fs.stat(source);
    } catch (err) {
      if (err.code === 'ENOENT') throw new ImageError(`${what}: file not found; check the path`);
      if (err.code === 'EACCES') throw new ImageError(`${what}: permission denied; make the file readable`);
      throw new ImageError(`${what}: cannot access the file (${err.message}); check the path`);
    }
    if (stat.isDirectory()) throw new ImageError(`${what} is a directory, not an image file; pass the path of an image file`);
    if (stat.size > limits.maxBytes) throw tooManyBytes(what, stat.size, limits);
    try {
      source = await fs.readFile(source);
    } catch (err) {
      throw new ImageError(`${what}: cannot read the file (${err.message}); check the path and permissions`);
    }
  } else if (source instanceof Uint8Array || source instanceof ArrayBuffer) {
    source = Buffer.from(source instanceof ArrayBuffer ? new Uint8Array(source) : source);
  } else {
    throw new ImageError(`${what}: unsupported image type ${source?.constructor?.name ?? typeof source}; pass a path or a Buffer`);
  }
  if (source.length === 0) throw new ImageError(`${what} is empty (0 bytes); pass a non-empty image file`);
  if (source.length > limits.maxBytes) throw tooManyBytes(what, source.length, limits);
  return source;
}

function tooManyBytes(what, size, limits) {
  return new ImageError(
    `${what} is too large (${(size / 2 ** 20).toFixed(1)} MiB; the limit is ${(limits.maxBytes / 2 ** 20).toFixed(1)} MiB); ` +
      're-encode or downscale it, or raise the maxBytes limit',
  );
}

function checkSize(what, w, h, limits) {
  if (Math.min(w, h) < limits.minSide) {
    throw new ImageError(`${what} is too small (${w}x${h}); each side must be at least ${limits.minSide} px`);
  }
  if (w * h > limits.maxPixels) {
    throw new ImageError(
      `${what} is too large (${w}x${h} = ${((w * h) / 1e6).toFixed(1)} megapixels; the limit is ` +
        `${(limits.maxPixels / 1e6).toFixed(1)}); downscale it, or raise the maxPixels limit`,
    );
  }
  const ratio = Math.max(w, h) / Math.min(w, h);
  if (ratio > limits.maxAspectRatio) {
    throw new ImageError(
      `${what} has an extreme aspect ratio (${w}x${h}, ${ratio.toFixed(1)}:1; the limit is ${limits.maxAspectRatio}:1); ` +
        'crop it, or raise the maxAspectRatio limit',
    );
  }
}

/** Straight alpha over a background colour, rounded: (c * a + bg * (255 - a) + 127) // 255 per channel. */
function composite(c, a, bg) {
  return Math.floor((c * a + bg * (255 - a) + 127) / 255);
}

/** 16-bit grey to 8 bits by its actual range (maven_edge.core.preprocess._stretch_to_uint8). */
function stretch16(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  const out = new Uint8Array(values.length);
  if (hi === lo) return out.fill(lo > 0 ? 255 : 0);
  const scale = 255 / (hi - lo);
  for (let i = 0; i < values.length; i++) {
    const x = (values[i] - lo) * scale;
    // numpy's rint: round half to even
    let r = Math.round(x);
    if (Math.abs(x % 1) === 0.5 && r % 2 !== 0) r -= 1;
    out[i] = Math.min(255, Math.max(0, r));
  }
  return out;
}

/**
 * Decode one image (a path or encoded bytes) to 8-bit RGB, as docs/hosts.md "Images" says.
 * Returns { data: Uint8Array (RGB interleaved), width, height }.
 */
export async function decodeImage(source, { limits = DEFAULT_IMAGE_LIMITS, name, background = [255, 255, 255] } = {}) {
  const what = label(source, name);
  const bytes = await readSource(source, what, limits);
  let meta;
  try {
    meta = await sharp(bytes, { limitInputPixels: false }).metadata();
  } catch (err) {
    throw new ImageError(
      `${what} is not a supported image (${err.message}); accepted formats are ${limits.formats.join(', ')}. Convert it to PNG or JPEG`,
    );
  }
  if (!limits.formats.includes(meta.format)) {
    throw new ImageError(
      `${what} is a ${meta.format} image, which is not accepted; accepted formats are ${limits.formats.join(', ')}. ` +
        'Convert it to PNG or JPEG',
    );
  }
  checkSize(what, meta.width, meta.height, limits); // header size, before any pixel is decoded
  const wide = meta.depth === 'ushort';
  let raw;
  try {
    let pipeline = sharp(bytes, { limitInputPixels: false, ignoreIcc: true, autoOrient: true, failOn: 'error', pages: 1 });
    // 16-bit: keep the stored values (no colourspace conversion); reduced to 8 bits below
    if (wide) pipeline = pipeline.toColourspace(meta.channels <= 2 ? 'grey16' : 'rgb16');
    raw = await pipeline.raw(wide ? { depth: 'ushort' } : {}).toBuffer({ resolveWithObject: true });
  } catch (err) {
    throw new ImageError(`${what} is truncated or corrupt (${err.message}); re-download or re-save the image and try again`);
  }
  const { width, height, channels } = raw.info;
  checkSize(what, width, height, limits);
  const n = width * height;
  let src = raw.data;
  let chans = channels;
  if (wide) {
    const words = new Uint16Array(src.buffer, src.byteOffset, src.length / 2);
    if (channels === 1) {
      src = stretch16(words);
    } else {
      src = new Uint8Array(words.length);
      for (let i = 0; i < words.length; i++) src[i] = words[i] >> 8;
    }
  }
  const out = new Uint8Array(n * 3);
  for (let i = 0; i < n; i++) {
    const p = i * chans;
    if (chans === 1) {
      out[i * 3] = out[i * 3 + 1] = out[i * 3 + 2] = src[p];
    } else if (chans === 2) {
      const a = src[p + 1];
      for (let c = 0; c < 3; c++) out[i * 3 + c] = composite(src[p], a, background[c]);
    } else if (chans === 3) {
      out[i * 3] = src[p];
      out[i * 3 + 1] = src[p + 1];
      out[i * 3 + 2] = src[p + 2];
    } else {
      const a = src[p + 3];
      for (let c = 0; c < 3; c++) out[i * 3 + c] = composite(src[p + c], a, background[c]);
    }
  }
  return { data: out, width, height };
}

/** Centre an RGB image on a square canvas of its long side filled with `fill` (floor offsets): host
 * contract version 1's padding, kept for callers; preprocessing now fits first (fitToSquare). */
export function padToSquare(img, fill) {
  const { data, width, height } = img;
  if (width === height) return img;
  const side = Math.max(width, height);
  const out = new Uint8Array(side * side * 3);
  for (let i = 0; i < side * side; i++) out.set(fill, i * 3);
  const x0 = Math.floor((side - width) / 2);
  const y0 = Math.floor((side - height) / 2);
  for (let y = 0; y < height; y++) {
    out.set(data.subarray(y * width * 3, (y + 1) * width * 3), ((y + y0) * side + x0) * 3);
  }
  return { data: out, width: side, height: side };
}

/**
 * The preprocessing of the manifest: { pad, size, resample, rescale, mean, std } from `preprocess`
 * and `host.preprocess`. Checked once when the pipeline opens.
 */
export function preprocessSpec(manifest) {
  const pre = manifest.preprocess;
  const host = manifest.host.preprocess;
  if (!host) throw new ConfigError('manifest.json host section lacks "preprocess"; re-export the artifacts');
  if (host.resample_implementation !== 'pillow') {
    throw new ConfigError(
      `manifest.json asks for ${JSON.stringify(host.resample_implementation)} resampling; this host implements Pillow's`,
    );
  }
  if (host.channel_order !== 'RGB' || host.layout !== 'NCHW' || host.dtype !== 'float32') {
    throw new ConfigError(
      `manifest.json asks for ${host.channel_order} ${host.layout} ${host.dtype} pixels; this host writes RGB NCHW float32`,
    );
  }
  const [w, h] = host.size;
  if (host.pad_to_square && host.resize_then_pad !== true) {
    throw new ConfigError('manifest.json host section does not say resize_then_pad; re-write it with a current maven-edge');
  }
  return {
    padToSquare: host.pad_to_square,
    padColor: host.pad_color,
    width: w,
    height: h,
    resample: host.resample ?? pre.resample,
    rescale: host.rescale,
    mean: host.mean.map(Math.fround),
    std: host.std.map(Math.fround),
    background: host.alpha_background,
  };
}

/** An RGB image -> float32 [3, H, W]: fit to the square and pad (or stretch), rescale (in doubles,
 * rounded to float32), normalise in float32. */
export function toPixelValues(img, spec, out = new Float32Array(3 * spec.width * spec.height), offset = 0) {
  const data = spec.padToSquare
    ? fitToSquare(img.data, img.width, img.height, 3, spec.width, spec.padColor, spec.resample)
    : resize(img.data, img.width, img.height, 3, spec.width, spec.height, spec.resample);
  const plane = spec.width * spec.height;
  for (let c = 0; c < 3; c++) {
    const m = spec.mean[c];
    const s = spec.std[c];
    for (let i = 0; i < plane; i++) {
      const x = Math.fround(data[i * 3 + c] * spec.rescale);
      out[offset + c * plane + i] = Math.fround(Math.fround(x - m) / s);
    }
  }
  return out;
}

/** Images (paths or Buffers) -> { data: Float32Array [n, 3, H, W], dims }. Errors name `image #i`. */
export async function preprocessImages(images, spec, limits = DEFAULT_IMAGE_LIMITS) {
  const plane = 3 * spec.width * spec.height;
  const data = new Float32Array(images.length * plane);
  for (const [i, source] of images.entries()) {
    const img = await decodeImage(source, { limits, name: `image #${i}`, background: spec.background });
    toPixelValues(img, spec, data, i * plane);
  }
  return { data, dims: [images.length, 3, spec.height, spec.width] };
}
