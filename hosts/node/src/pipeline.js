// MavenPipeline: images + prompt -> answer over the exported ONNX files, driven by manifest.json
// alone (docs/hosts.md; docs/design.md §5). The flow of one request:
//
//   validate (options, image count, placeholders, context length: before any model runs)
//   -> preprocess -> vision_encoder (all images in one batch) -> discrete_tokenizer
//   -> h_eos: one batched decoder pass over [codes, <eos_vis>] per image with an empty KV cache
//   -> patch_selector (or projector) -> prompt assembly (host.visual_sequence)
//   -> prefill -> decode loop on the KV cache -> incremental detokenization (streaming)
//
// Two decoder kinds, told apart by the manifest's decoder entry:
//   * torch.onnx export: present = concat(past, new); each step feeds the previous step's
//     present.* tensors as the next past_key_values.*;
//   * `past_present_share_buffer: true` (onnxruntime-genai builder, GroupQueryAttention): one
//     [1, kv_heads, capacity, head_dim] buffer per tensor, allocated at prefill, is fed as
//     past_key_values.* and bound as the pre-allocated present.* output, so each step writes only
//     the new positions.

import ort from 'onnxruntime-node';

import { ArtifactError, GenerationCancelled, InputError, PromptError } from './errors.js';
import { fromHalfArray, toHalfArray } from './float16.js';
import { DEFAULT_IMAGE_LIMITS, preprocessImages, preprocessSpec } from './image.js';
import { loadManifest } from './manifest.js';
import { Detokenizer, Sampler, generationConfig } from './sampling.js';
import { TextTokenizer } from './tokenizer.js';

/** Stage names in the order they run, and their keys in `timings` (milliseconds; they add up to totalMs). */
const STAGES = { preprocess: 'preprocessMs', vision: 'visionMs', discrete: 'discreteMs', h_eos: 'hEosMs', selector: 'selectorMs',
  assemble: 'assembleMs', prefill: 'prefillMs', decode: 'decodeMs' };
const OPT_LEVELS = { disable: 'disabled', basic: 'basic', extended: 'extended', all: 'all' };

function now() {
  return performance.now();
}

/** Float32 view of a float tensor's data (float16 converted). */
function floats(tensor) {
  if (tensor.type === 'float32') return tensor.data;
  if (tensor.type === 'float16') return fromHalfArray(tensor.data instanceof Uint16Array ? tensor.data : new Uint16Array(tensor.data.buffer));
  throw new ArtifactError(`expected a float tensor, got ${tensor.type}`);
}

/** A float tensor of `type` (float32 or float16) from float32 data. */
function floatTensor(type, data, dims) {
  if (type === 'float16') return new ort.Tensor('float16', toHalfArray(data), dims);
  return new ort.Tensor('float32', data instanceof Float32Array ? data : Float32Array.from(data), dims);
}

function intTensor(type, values, dims) {
  if (type === 'int32') return new ort.Tensor('int32', Int32Array.from(values, Number), dims);
  return new ort.Tensor('int64', BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

class Session {
  constructor(name, session, spec) {
    this.name = name;
    this.session = session;
    this.spec = spec;
    this.types = {};
    for (const m of session.inputMetadata ?? []) if (m.isTensor) this.types[m.name] = m.type;
  }

  static async create(name, file, spec, options) {
    let session;
    try {
      session = await ort.InferenceSession.create(file, options);
    } catch (err) {
      throw new ArtifactError(`onnxruntime-node cannot load ${name}.onnx: ${err.message}`);
    }
    return new Session(name, session, spec);
  }

  require(inputs, outputs) {
    const missIn = inputs.filter((n) => !this.session.inputNames.includes(n));
    const missOut = outputs.filter((n) => !this.session.outputNames.includes(n));
    if (missIn.length || missOut.length) {
      throw new ArtifactError(
        `${this.name}.onnx does not follow the maven-edge contract (docs/hosts.md): missing inputs [${missIn}], ` +
          `outputs [${missOut}]; re-export it with \`maven-edge export\``,
      );
    }
  }

  has(input) {
    return this.session.inputNames.includes(input);
  }

  type(input, fallback = 'float32') {
    return this.types[input] ?? fallback;
  }

  async run(feeds, fetches) {
    return this.session.run(feeds, fetches);
  }
}

/** Everything a request needs once validated. */
class Request {
  constructor(fields) {
    Object.assign(this, fields);
  }
}

export class MavenPipeline {
  /**
   * Open the artifacts in `directory` (manifest.json + the files it lists).
   * Options: verify (sha256 of every file, default true), threads (intra-op threads, 0 = onnxruntime's
   * default), graphOptimizationLevel (disable | basic | extended | all), executionProviders (default ['cpu']),
   * limits ({maxImages, maxPromptChars, image: {maxPixels, maxBytes, minSide, maxAspectRatio, formats}}).
   */
  static async open(directory, options = {}) {
    const known = new Set(['verify', 'threads', 'graphOptimizationLevel', 'executionProviders', 'limits']);
    const unknown = Object.keys(options).filter((k) => !known.has(k));
    if (unknown.length) throw new InputError(`unknown pipeline option(s) ${unknown.join(', ')}; known: ${[...known].join(', ')}`);
    const { verify = true, threads = 0, graphOptimizationLevel = 'all', executionProviders = ['cpu'] } = options;
    if (!(graphOptimizationLevel in OPT_LEVELS)) {
      throw new InputError(`graphOptimizationLevel must be one of ${Object.keys(OPT_LEVELS).join(', ')}, got ${graphOptimizationLevel}`);
    }
    if (!Number.isInteger(threads) || threads < 0) throw new InputError(`threads must be an integer >= 0, got ${threads}`);
    const loaded = await loadManifest(directory, { verify });
    const m = loaded.manifest;
    const tokenizer = await TextTokenizer.fromFile(loaded.tokenizerPath, m);
    const sessionOptions = {
      executionProviders,
      graphOptimizationLevel: OPT_LEVELS[graphOptimizationLevel],
      logSeverityLevel: 3,
      ...(threads ? { intraOpNumThreads: threads } : {}),
    };
    const sessions = {};
    for (const [name, comp] of Object.entries(m.components)) {
      sessions[name] = await Session.create(name, loaded.files[name], comp, sessionOptions);
    }
    return new MavenPipeline(loaded, tokenizer, sessions, options.limits ?? {});
  }

  constructor(loaded, tokenizer, sessions, limits) {
    const m = loaded.manifest;
    this.manifest = m;
    this.directory = loaded.directory;
    this.tokenizer = tokenizer;
    this.sessions = sessions;
    this.config = m.config;
    this.host = m.host;
    this.pre = preprocessSpec(m);
    const s = sessions;
    s.vision_encoder.require(['pixel_values'], ['patch_features']);
    s.embed_tokens.require(['input_ids'], ['inputs_embeds']);
    s.patch_selector.require(['patch_features', 'h_eos'], ['scores', 'selected_embeds', 'selected_indices']);
    this.discreteInput = s.discrete_tokenizer.has('patch_features') ? 'patch_features' : 'pixel_values';
    s.discrete_tokenizer.require([this.discreteInput], ['visual_codes']);
    const dec = (this.dec = s.decoder);
    const llm = m.config.llm;
    this.numLayers = dec.session.inputNames.filter((n) => /^past_key_values\.\d+\.key$/.test(n)).length;
    this.pastNames = [];
    this.presentNames = [];
    for (let i = 0; i < this.numLayers; i++) {
      for (const kv of ['key', 'value']) {
        this.pastNames.push(`past_key_values.${i}.${kv}`);
        this.presentNames.push(`present.${i}.${kv}`);
      }
    }
    dec.require(['inputs_embeds', 'attention_mask', ...this.pastNames], ['logits', 'hidden_states', ...this.presentNames]);
    if (this.numLayers !== llm.num_layers) {
      throw new ArtifactError(
        `decoder.onnx has ${this.numLayers} layers of KV cache, the manifest config says ${llm.num_layers}; re-export the artifacts`,
      );
    }
    this.kvHeads = llm.num_kv_heads;
    this.headDim = Math.floor(llm.hidden_size / llm.num_heads);
    this.hidden = llm.hidden_size;
    this.usesPositionIds = dec.has('position_ids');
    this.sharedKv = Boolean(m.components.decoder.extra?.past_present_share_buffer);
    this.kvType = dec.type(this.pastNames[0]);
    this.projector = s.projector ?? null;
    this.numPatches = m.num_patches;
    this.k = m.num_kept_patches;
    this.keepRatio = m.keep_ratio;
    this.maxImages = limits.maxImages ?? m.config.max_images;
    this.maxPromptChars = limits.maxPromptChars ?? 100_000;
    this.imageLimits = { ...DEFAULT_IMAGE_LIMITS, ...(limits.image ?? {}) };
    this.vs = m.host.visual_sequence;
    this.eosId = tokenizer.idOf(m.host.generation.stop_tokens[0]);
    this.stopIds = m.host.generation.stop_tokens.map((t) => tokenizer.idOf(t));
  }

  /** Facts about the opened artifacts (for reports). */
  describe() {
    return {
      host: 'node',
      onnxruntime: ort.env.versions?.node ?? 'unknown',
      artifacts: this.directory,
      preset: this.manifest.preset,
      recipe: this.manifest.recipe,
      mode: this.manifest.mode,
      decoder: this.sharedKv ? 'past_present_share_buffer (one preallocated buffer per KV tensor)' : 'concat past',
    };
  }

  /** The prompt for a question in the layout the model was trained on (manifest host.prompt). */
  buildPrompt(numImages, text) {
    const t = this.host.prompt.template;
    const images = numImages === 1 ? t.single_image
      : Array.from({ length: numImages }, (_, k) => t.image_line.replaceAll('{k}', String(k + 1))).join(t.image_line_join);
    return t.prompt.replace('{images}', images).replace('{text}', text);
  }

  async release() {
    for (const s of Object.values(this.sessions)) await s.session.release?.();
  }

  // ---- validation -----------------------------------------------------------------------------
  validate(images, prompt, opts) {
    const gen = generationConfig(opts);
    if (typeof prompt !== 'string') throw new PromptError(`prompt must be a string, got ${typeof prompt}`);
    if (prompt.length > this.maxPromptChars) {
      throw new PromptError(
        `the prompt has ${prompt.length} characters, over the limit of ${this.maxPromptChars}; shorten it or raise limits.maxPromptChars`,
      );
    }
    const list = images == null ? [] : Array.isArray(images) ? images : [images];
    const n = list.length;
    if (n > this.maxImages) {
      throw new InputError(`${n} images exceed the limit of ${this.maxImages} per request; send fewer images or raise limits.maxImages`);
    }
    if (this.vs.image_slots && n > this.config.max_images) {
      throw new InputError(`${n} images in one request, but this model has image slots for ${this.config.max_images}; send fewer images`);
    }
    const mode = opts.mode ?? this.manifest.mode;
    const spec = this.vs.modes[mode];
    if (!spec) throw new InputError(`unknown mode ${JSON.stringify(mode)}; choose one of ${Object.keys(this.vs.modes).join(', ')}`);
    let k = null;
    let keepRatio = null;
    if (spec.patches === 'selected') {
      keepRatio = opts.keepRatio ?? this.keepRatio;
      if (typeof keepRatio !== 'number' || !(keepRatio > 0 && keepRatio <= 1)) {
        throw new InputError(`keepRatio must be a number in (0, 1], got ${JSON.stringify(keepRatio)}`);
      }
      // host.visual_sequence.keep_rule
      k = Math.max(1, Math.floor(keepRatio * this.numPatches + 1e-9));
      if (k !== this.k && !this.projector) {
        throw new InputError(
          `these artifacts were exported with keep_ratio ${this.keepRatio} (k=${this.k} of ${this.numPatches} patches); ` +
            `keepRatio ${keepRatio} needs k=${k} and a projector.onnx. Re-export with \`maven-edge export ... --keep-ratio ${keepRatio}\``,
        );
      }
    }
    if (spec.patches === 'all' && !this.projector) {
      throw new InputError('these artifacts cannot run continuous mode (no projector.onnx was exported); re-export them');
    }
    if (opts.signal != null && typeof opts.signal.aborted !== 'boolean') throw new InputError('signal must be an AbortSignal');
    if (opts.onText != null && typeof opts.onText !== 'function') throw new InputError('onText must be a function');
    let promptIds;
    try {
      promptIds = this.tokenizer.encodePrompt(prompt);
    } catch (err) {
      if (err instanceof PromptError) throw err;
      throw new PromptError(`the prompt cannot be tokenized: ${err.message}`);
    }
    const positions = [];
    promptIds.forEach((id, i) => id === this.tokenizer.imageId && positions.push(i));
    if (positions.length !== n) {
      throw new PromptError(
        `the prompt has ${positions.length} ${this.tokenizer.placeholder} placeholder(s) but ${n} image(s) were given; ` +
          `put exactly one ${this.tokenizer.placeholder} in the prompt for each image, in order`,
      );
    }
    const patches = spec.patches === 'selected' ? k : spec.patches === 'all' ? this.numPatches : 0;
    const tokensPerImage = (spec.codes ? this.vs.codes_per_image : 0) + patches;
    const markers = this.vs.layout.filter((x) => x !== 'codes' && x !== 'patches').length;
    const total = promptIds.length - n + n * (tokensPerImage + markers);
    const limit = this.host.generation.max_positions;
    if (total + gen.maxNewTokens > limit) {
      throw new PromptError(
        `the request needs ${total} prompt tokens (${promptIds.length - n} text, ${n} image(s) x ${tokensPerImage + markers} visual) + ` +
          `${gen.maxNewTokens} new tokens = ${total + gen.maxNewTokens}, over the context limit of ${limit}; use fewer images, a ` +
          'shorter prompt, a smaller keepRatio or fewer new tokens',
      );
    }
    return new Request({ images: list, promptIds, positions, gen, mode, spec, k, keepRatio, tokensPerImage, total,
      signal: opts.signal ?? null, onText: opts.onText ?? null });
  }

  // ---- stages ---------------------------------------------------------------------------------
  async embed(ids, rows) {
    const s = this.sessions.embed_tokens;
    const out = await s.run({ input_ids: intTensor(s.type('input_ids', 'int64'), ids, [rows, ids.length / rows]) });
    return floats(out.inputs_embeds);
  }

  /** One decoder pass with an empty cache over [b, t] embeddings; returns hidden_states data. */
  async hiddenStates(embeds, b, t) {
    const dec = this.dec;
    const feeds = {
      inputs_embeds: floatTensor(dec.type('inputs_embeds'), embeds, [b, t, this.hidden]),
      attention_mask: intTensor(dec.type('attention_mask', 'int64'), new Array(b * t).fill(1), [b, t]),
    };
    if (this.usesPositionIds) {
      feeds.position_ids = intTensor(dec.type('position_ids', 'int64'), Array.from({ length: b * t }, (_, i) => i % t), [b, t]);
    }
    const empty = this.kvType === 'float16' ? new Uint16Array(0) : new Float32Array(0);
    for (const name of this.pastNames) feeds[name] = new ort.Tensor(this.kvType, empty, [b, this.kvHeads, 0, this.headDim]);
    const out = await dec.run(feeds, ['hidden_states']);
    return floats(out.hidden_states);
  }

  /** Visual side of a request: per-image sequences [n, T_img + markers, D] as Float32Array rows. */
  async encodeVisual(req, clock, checkCancel) {
    const n = req.images.length;
    const D = this.hidden;
    const result = { embeds: null, indices: null, scores: null };
    if (!n) return result;
    let pixels;
    await clock('preprocess', async () => {
      pixels = await preprocessImages(req.images, this.pre, this.imageLimits);
    });
    checkCancel();
    let feats;
    await clock('vision', async () => {
      const v = this.sessions.vision_encoder;
      const out = await v.run({ pixel_values: floatTensor(v.type('pixel_values'), pixels.data, pixels.dims) });
      feats = out.patch_features;
    });
    checkCancel();
    const asInput = (session, name) => (feats.type === session.type(name) ? feats
      : floatTensor(session.type(name), floats(feats), feats.dims));
    let codes = null;
    const Q = this.vs.codes_per_image;
    if (req.spec.codes || req.spec.patches === 'selected') {
      await clock('discrete', async () => {
        const d = this.sessions.discrete_tokenizer;
        const input = this.discreteInput === 'patch_features' ? asInput(d, 'patch_features')
          : floatTensor(d.type('pixel_values'), pixels.data, pixels.dims);
        const out = await d.run({ [this.discreteInput]: input });
        codes = Array.from(out.visual_codes.data, Number);
      });
      checkCancel();
    }
    let patches = null; // Float32Array [n, P, D]
    let P = 0;
    if (req.spec.patches === 'selected') {
      let hEos;
      await clock('h_eos', async () => {
        // host.h_eos: [codes, <eos_vis>] per image, one batched pass, empty cache, row `position`
        const seq = this.host.h_eos.input;
        const ids = [];
        for (let i = 0; i < n; i++) {
          for (const item of seq) {
            if (item === 'codes') ids.push(...codes.slice(i * Q, (i + 1) * Q));
            else ids.push(this.tokenizer.idOf(item));
          }
        }
        const t = ids.length / n;
        const hidden = await this.hiddenStates(await this.embed(ids, n), n, t);
        const pos = ((this.host.h_eos.position % t) + t) % t;
        hEos = new Float32Array(n * D);
        for (let i = 0; i < n; i++) hEos.set(hidden.subarray((i * t + pos) * D, (i * t + pos + 1) * D), i * D);
      });
      checkCancel();
      await clock('selector', async () => {
        const sel = this.sessions.patch_selector;
        const out = await sel.run({
          patch_features: asInput(sel, 'patch_features'),
          h_eos: floatTensor(sel.type('h_eos'), hEos, [n, D]),
        });
        const scores = floats(out.scores);
        result.scores = scores;
        P = req.k;
        if (req.k === this.k) {
          patches = floats(out.selected_embeds);
          result.indices = chunk(Array.from(out.selected_indices.data, Number), this.k);
        } else {
          // another keep ratio: rank the scores (descending, stable), keep k in raster order, project all, gather
          const N = this.numPatches;
          const all = await this.projectAll(asInput(this.projector, this.projector.session.inputNames[0]));
          patches = new Float32Array(n * P * D);
          result.indices = [];
          for (let i = 0; i < n; i++) {
            const row = scores.subarray(i * N, (i + 1) * N);
            const order = Array.from(row.keys()).sort((a, b) => row[b] - row[a] || a - b).slice(0, P).sort((a, b) => a - b);
            result.indices.push(order);
            order.forEach((idx, j) => patches.set(all.subarray((i * N + idx) * D, (i * N + idx + 1) * D), (i * P + j) * D));
          }
        }
      });
    } else if (req.spec.patches === 'all') {
      await clock('selector', async () => {
        patches = await this.projectAll(asInput(this.projector, this.projector.session.inputNames[0]));
        P = this.numPatches;
      });
    }
    checkCancel();
    await clock('assemble', async () => {
      // host.visual_sequence.layout: token names, "codes", "patches"
      const layout = this.vs.layout;
      const ids = [];
      for (let i = 0; i < n; i++) {
        for (const item of layout) {
          if (item === 'codes') {
            if (req.spec.codes) ids.push(...codes.slice(i * Q, (i + 1) * Q));
          } else if (item !== 'patches') {
            ids.push(this.tokenizer.idOf(item));
          }
        }
      }
      const per = ids.length / n;
      const rows = await this.embed(ids, n);
      const T = per + P;
      const embeds = new Float32Array(n * T * D);
      for (let i = 0; i < n; i++) {
        let src = 0;
        let dst = 0;
        for (const item of layout) {
          const count = item === 'patches' ? P : item === 'codes' ? (req.spec.codes ? Q : 0) : 1;
          if (item === 'patches') {
            if (P) embeds.set(patches.subarray(i * P * D, (i + 1) * P * D), (i * T + dst) * D);
          } else {
            embeds.set(rows.subarray((i * per + src) * D, (i * per + src + count) * D), (i * T + dst) * D);
            src += count;
          }
          dst += count;
        }
      }
      result.embeds = { data: embeds, rowsPerImage: T };
    });
    return result;
  }

  async projectAll(input) {
    const out = await this.projector.run({ [this.projector.session.inputNames[0]]: input });
    return floats(out[this.projector.session.outputNames[0]]);
  }

  // ---- KV-cache loop ----------------------------------------------------------------------------
  newCache(capacity) {
    const length = this.sharedKv ? capacity : 0;
    const size = this.kvHeads * length * this.headDim;
    const make = () => new ort.Tensor(this.kvType, this.kvType === 'float16' ? new Uint16Array(size) : new Float32Array(size),
      [1, this.kvHeads, length, this.headDim]);
    return { past: this.pastNames.map(make), length: 0, capacity };
  }

  /** One decoder call on `seq` new positions (embeds Float32Array [seq * D]); returns the last row's logits. */
  async step(cache, embeds, seq) {
    const dec = this.dec;
    const total = cache.length + seq;
    const feeds = {
      inputs_embeds: floatTensor(dec.type('inputs_embeds'), embeds, [1, seq, this.hidden]),
      attention_mask: intTensor(dec.type('attention_mask', 'int64'), new Array(total).fill(1), [1, total]),
    };
    if (this.usesPositionIds) {
      feeds.position_ids = intTensor(dec.type('position_ids', 'int64'), Array.from({ length: seq }, (_, i) => cache.length + i), [1, seq]);
    }
    this.pastNames.forEach((name, i) => {
      feeds[name] = cache.past[i];
    });
    let fetches;
    if (this.sharedKv) {
      // the attention writes the new positions into the same buffers it reads the past from
      fetches = { logits: null };
      this.presentNames.forEach((name, i) => {
        fetches[name] = cache.past[i];
      });
    } else {
      fetches = ['logits', ...this.presentNames];
    }
    const out = await dec.run(feeds, fetches);
    if (!this.sharedKv) cache.past = this.presentNames.map((name) => out[name]);
    cache.length = total;
    const logits = out.logits;
    const V = logits.dims[2];
    const data = floats(logits);
    return data.subarray((seq - 1) * V, seq * V);
  }

  // ---- public API -------------------------------------------------------------------------------
  /**
   * Answer `prompt` about `images` (paths or Buffers, one per <image> placeholder, in order).
   * Options: maxNewTokens (64), greedy, temperature, topK, topP, seed, stop (strings), stopTokenIds,
   * mode, keepRatio, signal (AbortSignal), onText (called with each text piece as it is decoded).
   * Returns { text, tokenIds, finishReason, promptTokens, visualTokensPerImage, selectedIndices, mode,
   * keepRatio, timings }.
   */
  async generate(images, prompt, options = {}) {
    const t0 = now();
    const req = this.validate(images, prompt, options);
    const timings = Object.fromEntries(Object.values(STAGES).map((key) => [key, 0]));
    timings.preprocessMs = now() - t0;
    const clock = async (stage, fn) => {
      const start = now();
      try {
        return await fn();
      } finally {
        timings[STAGES[stage]] += now() - start;
      }
    };
    const result = {
      text: '', tokenIds: [], finishReason: 'length', promptTokens: req.total, mode: req.mode, keepRatio: req.keepRatio,
      visualTokensPerImage: req.images.map(() => req.tokensPerImage), selectedIndices: null, timings,
    };
    const checkCancel = () => {
      if (req.signal?.aborted) {
        result.finishReason = 'cancelled';
        timings.totalMs = now() - t0;
        const err = new GenerationCancelled('the generation was cancelled by its caller');
        err.result = result;
        throw err;
      }
    };
    const vis = await this.encodeVisual(req, clock, checkCancel);
    result.selectedIndices = vis.indices;
    const D = this.hidden;
    let embeds;
    await clock('assemble', async () => {
      const n = req.images.length;
      const slotIds = this.vs.image_slots && n ? Array.from({ length: n }, (_, i) => this.vs.first_slot_id + i) : [];
      const ids = [...req.promptIds, ...slotIds];
      const rows = await this.embed(ids, 1);
      const text = rows.subarray(0, req.promptIds.length * D);
      const T = vis.embeds?.rowsPerImage ?? 0;
      const visual = vis.embeds?.data;
      if (slotIds.length) {
        // image slot k's vector on every row of the k-th image's sequence
        for (let i = 0; i < n; i++) {
          const slot = rows.subarray((req.promptIds.length + i) * D, (req.promptIds.length + i + 1) * D);
          for (let r = 0; r < T; r++) for (let d = 0; d < D; d++) visual[(i * T + r) * D + d] += slot[d];
        }
      }
      embeds = new Float32Array(req.total * D);
      let dst = 0;
      let prev = 0;
      req.positions.forEach((pos, i) => {
        embeds.set(text.subarray(prev * D, pos * D), dst * D);
        dst += pos - prev;
        embeds.set(visual.subarray(i * T * D, (i + 1) * T * D), dst * D);
        dst += T;
        prev = pos + 1;
      });
      embeds.set(text.subarray(prev * D), dst * D);
      dst += req.promptIds.length - prev;
      if (dst !== req.total) throw new Error(`assembled ${dst} positions, expected ${req.total}`);
    });
    checkCancel();
    const gen = req.gen;
    const cache = this.newCache(req.total + gen.maxNewTokens);
    let logits;
    await clock('prefill', async () => {
      logits = await this.step(cache, embeds, req.total);
    });
    const sampler = new Sampler(gen, this.host.generation.sample_below);
    const stopIds = new Set([...this.stopIds, ...gen.stopTokenIds]);
    const detok = new Detokenizer(this.tokenizer, gen.stop);
    let firstAt = null;
    for (let step = 0; ; ) {
      checkCancel();
      const start = now();
      const token = sampler.pick(logits);
      if (firstAt === null) {
        firstAt = now() - t0;
        timings.ttftMs = firstAt;
      }
      if (stopIds.has(token)) {
        result.finishReason = this.stopIds.includes(token) ? 'eos' : 'stop_token';
        timings.decodeMs += now() - start;
        break;
      }
      result.tokenIds.push(token);
      const piece = detok.add(token);
      timings.decodeMs += now() - start;
      if (piece && req.onText) req.onText(piece);
      if (detok.stopped) {
        result.finishReason = 'stop_string';
        break;
      }
      step += 1;
      if (step >= gen.maxNewTokens) break;
      checkCancel();
      await clock('decode', async () => {
        const row = await this.embed([token], 1);
        logits = await this.step(cache, row, 1);
      });
    }
    const rest = detok.finish();
    if (rest && req.onText) req.onText(rest);
    result.text = detok.emitted;
    timings.totalMs = now() - t0;
    const after = result.tokenIds.length - 1;
    const decodeS = (timings.totalMs - (firstAt ?? 0)) / 1e3;
    timings.decodeTokensPerS = after > 0 && decodeS > 0 ? after / decodeS : 0;
    return result;
  }

  /** Like generate, as an async iterator of text pieces; `.result` resolves to the full result. */
  stream(images, prompt, options = {}) {
    // Leaving the loop early (break, return, throw) cancels the generation, like closing a
    // Python GenerationStream; the caller's own signal still works.
    const controller = new AbortController();
    options.signal?.addEventListener?.('abort', () => controller.abort(), { once: true });
    if (options.signal?.aborted) controller.abort();
    const queue = [];
    let wake = null;
    let done = false;
    let failure = null;
    const result = this.generate(images, prompt, {
      ...options,
      signal: controller.signal,
      onText: (piece) => {
        options.onText?.(piece);
        queue.push(piece);
        wake?.();
      },
    }).then(
      (r) => {
        done = true;
        wake?.();
        return r;
      },
      (err) => {
        done = true;
        failure = err;
        wake?.();
        throw err;
      },
    );
    result.catch(() => {});
    const iterator = (async function* () {
      try {
        for (;;) {
          if (queue.length) {
            yield queue.shift();
            continue;
          }
          if (done) {
            if (failure) throw failure;
            return;
          }
          await new Promise((resolve) => {
            wake = resolve;
          });
          wake = null;
        }
      } finally {
        if (!done) controller.abort();
      }
    })();
    iterator.result = result;
    return iterator;
  }
}

function chunk(values, size) {
  const out = [];
  for (let i = 0; i < values.length; i += size) out.push(values.slice(i, i + size));
  return out;
}

/** Open a pipeline: `await openPipeline('artifacts/tiny', { threads: 2 })`. */
export function openPipeline(directory, options) {
  return MavenPipeline.open(directory, options);
}
