// Unit checks that need no artifacts: half-precision rounding, greedy ties, the resampler's
// fixed-point details, generation options.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { fromHalfBits, toHalfBits } from '../src/float16.js';
import { axisCoefficients, FILTERS, fitToSquare, fittedSize, resize } from '../src/resample.js';
import { InputError, Sampler, generationConfig } from '../src/index.js';

test('float16 conversion rounds to nearest even and round-trips every half value', () => {
  for (let h = 0; h < 0x10000; h++) {
    const exp = (h >> 10) & 0x1f;
    if (exp === 0x1f && (h & 0x3ff)) continue; // NaN payloads
    assert.equal(toHalfBits(fromHalfBits(h)), h === 0x8000 ? 0x8000 : h);
  }
  assert.equal(toHalfBits(1 + 2 ** -11), 0x3c00); // halfway: to even (1.0)
  assert.equal(toHalfBits(1 + 3 * 2 ** -11), 0x3c02); // halfway: to even (1 + 2^-9)
  assert.equal(toHalfBits(70000), 0x7c00);
});

test('greedy picks the first index of the maximum, only below the allowed vocabulary', () => {
  const s = new Sampler(generationConfig({}), 4);
  assert.equal(s.pick(Float32Array.from([0, 3, 3, 1, 9])), 1);
});

test('resampling weights sum to one in fixed point and keep flat images flat', () => {
  for (const [inSize, outSize] of [[131, 64], [64, 64], [33, 64], [640, 64]]) {
    const { ksize, bounds, weights } = axisCoefficients(inSize, outSize, FILTERS.bicubic);
    for (let x = 0; x < outSize; x++) {
      let sum = 0;
      for (let i = 0; i < bounds[x * 2 + 1]; i++) sum += weights[x * ksize + i];
      assert.ok(Math.abs(sum - (1 << 22)) <= ksize, `${inSize}->${outSize} at ${x}: ${sum}`);
    }
  }
  const flat = new Uint8Array(97 * 131 * 3).fill(200);
  assert.ok(resize(flat, 97, 131, 3, 64, 64, 'bicubic').every((v) => v === 200));
  assert.throws(() => resize(flat, 97, 131, 3, 64, 64, 'mitchell'), /unknown resample filter/);
});

test('generation options are checked', () => {
  assert.throws(() => generationConfig({ topP: 0 }), InputError);
  assert.throws(() => generationConfig({ stop: 'x' }), /array of strings/);
  assert.equal(generationConfig({ temperature: 0.7 }).doSample, true);
  assert.equal(generationConfig({ temperature: 0.7, greedy: true }).doSample, false);
});

test('fitToSquare resizes the long side to the square and centres the image on the fill (host contract 2)', () => {
  assert.deepEqual(fittedSize(44700, 894, 64), [64, 1]);
  assert.deepEqual(fittedSize(894, 44700, 64), [1, 64]);
  assert.deepEqual(fittedSize(30, 20, 16), [16, 11]);
  assert.deepEqual(fittedSize(64, 64, 64), [64, 64]);
  const white = new Uint8Array(16 * 8 * 3).fill(255);
  const out = fitToSquare(white, 16, 8, 3, 8, [1, 2, 3], 'bicubic');
  const px = (x, y) => Array.from(out.subarray((y * 8 + x) * 3, (y * 8 + x) * 3 + 3));
  assert.deepEqual(px(0, 0), [1, 2, 3]); // rows 0-1 and 6-7: the fill
  assert.deepEqual(px(7, 1), [1, 2, 3]);
  assert.deepEqual(px(0, 2), [255, 255, 255]); // rows 2-5: the image, resized to 8 x 4
  assert.deepEqual(px(7, 5), [255, 255, 255]);
  assert.deepEqual(px(3, 6), [1, 2, 3]);
});
