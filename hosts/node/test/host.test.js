// The Node host against the Python runtime's answers on small exports (test/fixture.js):
// manifest verification, tokenizer, preprocessing, greedy tokens on both decoder kinds, modes,
// streaming, stop strings, refusals and the CLI.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';

import {
  ArtifactError, GenerationCancelled, HOST_CONTRACT_VERSION, ImageError, InputError, PromptError, TextTokenizer,
  answerText, loadManifest, openPipeline, preprocessImages,
} from '../src/index.js';
import { REPO, fixture } from './fixture.js';

const run = promisify(execFile);
const CLI = path.join(REPO, 'hosts', 'node', 'bin', 'maven-edge.js');

function copyDir(src, dst) {
  fs.cpSync(src, dst, { recursive: true });
  return dst;
}

describe('answer text', () => {
  test('leading whitespace goes as Python str.lstrip() removes it (not trimStart)', () => {
    assert.equal(answerText(' blue'), 'blue');
    assert.equal(answerText('\t\n\x1c\x1f\x85\u3000 two words '), 'two words ');
    assert.equal(answerText('\ufeffa'), '\ufeffa'); // not whitespace for Python
    assert.equal(answerText(''), '');
  });
});

describe('manifest', () => {
  test('loads and verifies every file; a tampered file is refused', async () => {
    const { exports } = fixture();
    const { manifest } = await loadManifest(exports.torch);
    assert.equal(manifest.host.version, HOST_CONTRACT_VERSION);
    const tmp = copyDir(exports.torch, fs.mkdtempSync(path.join(os.tmpdir(), 'maven-node-')));
    try {
      const file = path.join(tmp, 'embed_tokens.onnx');
      const bytes = fs.readFileSync(file);
      bytes[bytes.length - 1] ^= 1;
      fs.writeFileSync(file, bytes);
      await assert.rejects(loadManifest(tmp), (err) => err instanceof ArtifactError && /does not match the sha256/.test(err.message));
      await assert.rejects(openPipeline(tmp), ArtifactError);
      await loadManifest(tmp, { verify: false }); // without verification only the paths are checked
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });

  test('paths outside the directory, missing files and manifests without a host section are refused', async () => {
    const { exports } = fixture();
    const tmp = copyDir(exports.torch, fs.mkdtempSync(path.join(os.tmpdir(), 'maven-node-')));
    const file = path.join(tmp, 'manifest.json');
    const original = fs.readFileSync(file, 'utf8');
    try {
      const m = JSON.parse(original);
      m.tokenizer.path = '../tokenizer.json';
      fs.writeFileSync(file, JSON.stringify(m));
      await assert.rejects(loadManifest(tmp), /outside the artifact directory/);
      const m2 = JSON.parse(original);
      delete m2.host;
      fs.writeFileSync(file, JSON.stringify(m2));
      await assert.rejects(loadManifest(tmp), /no "host" section.*host_contract/);
      fs.writeFileSync(file, original);
      fs.rmSync(path.join(tmp, 'decoder.onnx'));
      await assert.rejects(loadManifest(tmp), /decoder.onnx listed in manifest.json is missing/);
      await assert.rejects(loadManifest(path.join(tmp, 'nope')), /has no manifest.json/);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});

describe('tokenizer', () => {
  test('ids equal the Python tokenizer; special-token text stays text', async () => {
    const { exports, golden } = fixture();
    const { manifest, tokenizerPath } = await loadManifest(exports.torch, { verify: false });
    const tok = await TextTokenizer.fromFile(tokenizerPath, manifest);
    for (const { text, ids } of golden.texts) assert.deepEqual(tok.encode(text), ids, JSON.stringify(text));
    for (const { prompt, ids } of golden.prompts) assert.deepEqual(tok.encodePrompt(prompt), ids, JSON.stringify(prompt));
    for (const { ids, text } of golden.decode) assert.equal(tok.decode(ids), text);
    assert.ok(!tok.encode('<eos>').includes(manifest.vocab.special_ids['<eos>']));
  });
});

describe('preprocessing', () => {
  test('pixel tensors are bit-identical to Python for PNG/JPEG of other sizes, RGBA and grey', async () => {
    const { exports, golden, image } = fixture();
    const pipe = await openPipeline(exports.torch, { threads: 1 });
    try {
      for (const img of golden.images) {
        const { data } = await preprocessImages([image(img.path)], pipe.pre);
        const ref = new Float32Array(fs.readFileSync(image(img.pixels)).buffer.slice(0));
        assert.equal(data.length, ref.length);
        let worst = 0;
        for (let i = 0; i < ref.length; i++) worst = Math.max(worst, Math.abs(data[i] - ref[i]));
        assert.equal(worst, 0, `${img.path}: max abs diff ${worst}`);
      }
    } finally {
      await pipe.release();
    }
  });
});

for (const kind of ['torch', 'genai', 'slots']) {
  describe(`generation (${kind} export)`, () => {
    let pipe = null;
    before(async () => {
      const { exports } = fixture();
      if (exports[kind]) pipe = await openPipeline(exports[kind], { threads: 1 });
    });
    after(async () => pipe?.release());

    test('greedy token ids equal the Python ORT runtime (images, several images, text only, modes, keep ratio)', async (t) => {
      const { golden, image } = fixture();
      if (!pipe) return t.skip('this fixture has no genai export (onnxruntime-genai is not installed)');
      assert.equal(pipe.sharedKv, kind === 'genai');
      assert.equal(pipe.vs.image_slots, kind === 'slots');
      for (const r of golden.answers[kind]) {
        const res = await pipe.generate(r.images.map(image), r.prompt, r.options);
        const what = `${JSON.stringify(r.prompt)} ${JSON.stringify(r.options)}`;
        assert.deepEqual(res.tokenIds, r.token_ids, what);
        assert.equal(res.text, r.text, what);
        assert.equal(res.finishReason, r.finish_reason, what);
        assert.equal(res.promptTokens, r.prompt_tokens, what);
        assert.deepEqual(res.selectedIndices, r.selected_indices, what);
      }
    });

    test('streaming pieces join to the text; stop strings cut it; cancellation reports the partial result', async (t) => {
      const { golden, image } = fixture();
      if (!pipe) return t.skip('no genai export');
      const r = golden.answers[kind][0];
      const pieces = [];
      for await (const piece of pipe.stream(r.images.map(image), r.prompt, r.options)) pieces.push(piece);
      assert.equal(pieces.join(''), r.text);
      const called = [];
      const res = await pipe.generate(r.images.map(image), r.prompt, { ...r.options, onText: (p) => called.push(p) });
      assert.equal(called.join(''), res.text);
      if (r.text.length > 2) {
        const stop = r.text.slice(1, 3);
        const cut = await pipe.generate(r.images.map(image), r.prompt, { ...r.options, stop: [stop] });
        assert.equal(cut.text, r.text.slice(0, r.text.indexOf(stop)));
        assert.equal(cut.finishReason, 'stop_string');
      }
      const early = pipe.stream(r.images.map(image), r.prompt, { ...r.options, maxNewTokens: 30 });
      for await (const piece of early) {
        assert.ok(piece.length > 0);
        break; // leaving the loop cancels the rest of the generation
      }
      const outcome = await early.result.catch((err) => err);
      assert.ok(outcome instanceof GenerationCancelled || outcome.tokenIds.length <= 30);
      assert.deepEqual((await pipe.generate(r.images.map(image), r.prompt, r.options)).tokenIds, r.token_ids);
      const controller = new AbortController();
      controller.abort();
      await assert.rejects(pipe.generate(r.images.map(image), r.prompt, { signal: controller.signal }),
        (err) => err instanceof GenerationCancelled && err.result.finishReason === 'cancelled');
      const seeded = [1, 2].map(() => pipe.generate(r.images.map(image), r.prompt, { ...r.options, temperature: 0.8, seed: 3 }));
      const [a, b] = await Promise.all(seeded);
      assert.deepEqual(a.tokenIds, b.tokenIds);
    });
  });
}

describe('refusals', () => {
  let pipe;
  before(async () => {
    pipe = await openPipeline(fixture().exports.torch, { threads: 1 });
  });
  after(async () => pipe.release());

  test('bad requests fail with clear errors before any model runs', async () => {
    const { image } = fixture();
    const png = image('img0_97x131.png');
    await assert.rejects(pipe.generate([png], 'no placeholder'), (e) => e instanceof PromptError && /1 image\(s\)/.test(e.message));
    await assert.rejects(pipe.generate([png], '<image> hi', { maxNewTokens: 100000 }), (e) => e instanceof PromptError && /context limit/.test(e.message));
    await assert.rejects(pipe.generate([png], '<image> hi', { maxNewTokens: 0 }), InputError);
    await assert.rejects(pipe.generate([png], '<image> hi', { bogus: 1 }), /unknown generation option/);
    await assert.rejects(pipe.generate([png], '<image> hi', { mode: 'nope' }), /unknown mode/);
    await assert.rejects(pipe.generate(['/nonexistent.png'], '<image> hi'), (e) => e instanceof ImageError && /not found/.test(e.message));
    await assert.rejects(pipe.generate([Buffer.from('not an image')], '<image> hi'), ImageError);
    const truncated = fs.readFileSync(image('img1_200x64.jpg')).subarray(0, 300);
    await assert.rejects(pipe.generate([truncated], '<image> hi'), ImageError);
  });

  test('the CLI answers, prints JSON, and reports bad input without a stack trace', async () => {
    const { exports, golden, image } = fixture();
    const r = golden.answers.torch[0];
    const { stdout } = await run('node', [CLI, '--artifacts', exports.torch, '--image', image(r.images[0]), '--prompt', r.prompt,
      '--max-new-tokens', String(r.options.maxNewTokens), '--json', '--threads', '1']);
    assert.deepEqual(JSON.parse(stdout).token_ids, r.token_ids);
    const q = await run('node', [CLI, '--artifacts', exports.torch, '--image', image(r.images[0]), '--question',
      'Question: what color is the circle?', '--max-new-tokens', String(r.options.maxNewTokens), '--threads', '1']);
    assert.equal(q.stdout, `${r.text.trim()}\n`); // --question builds the same prompt from host.prompt
    const bad = await run('node', [CLI, '--artifacts', exports.torch, '--image', '/nonexistent.png', '--prompt', '<image>'])
      .catch((e) => e);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /^error: image #0 \("\/nonexistent.png"\): file not found/);
    assert.doesNotMatch(bad.stderr, /at .*\.js:\d+/);
    const missing = await run('node', [CLI, '--artifacts', '/nonexistent', '--prompt', 'x']).catch((e) => e);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /has no manifest.json/);
  });
});
