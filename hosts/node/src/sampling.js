// Token selection and stopping (the Node counterpart of maven_edge.core.sampling): only ids
// below `host.generation.sample_below` are ever picked; greedy is the first index of the
// maximum (numpy's argmax). Sampling applies temperature, then top-k, then top-p (nucleus) to a
// softmax computed in doubles, and draws with a seeded generator.
//
// Seeded sampling is reproducible within this host (same seed, same logits -> same tokens) but
// does not reproduce the Python runtime's stream, which draws from numpy's PCG64; greedy output
// is what the hosts share token for token.

import { InputError } from './errors.js';

/** A small, fast seeded generator (SplitMix64 seeding, xoshiro128** core); uniform doubles in [0, 1). */
export class Random {
  constructor(seed = 0) {
    let s = BigInt.asUintN(64, BigInt(seed));
    const next = () => {
      s = BigInt.asUintN(64, s + 0x9e3779b97f4a7c15n);
      let z = s;
      z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
      z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
      return z ^ (z >> 31n);
    };
    const a = next();
    const b = next();
    this.s = new Uint32Array([Number(a & 0xffffffffn), Number(a >> 32n), Number(b & 0xffffffffn), Number(b >> 32n)]);
  }

  nextUint32() {
    const s = this.s;
    const rotl = (x, k) => (x << k) | (x >>> (32 - k));
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** A double in [0, 1) with 53 random bits. */
  random() {
    const hi = this.nextUint32() >>> 5;
    const lo = this.nextUint32() >>> 6;
    return (hi * 67108864 + lo) / 9007199254740992;
  }
}

/** Generation options with their defaults, checked (the Node form of GenerationConfig.validate). */
export function generationConfig(opts = {}) {
  const known = new Set(['maxNewTokens', 'greedy', 'temperature', 'topK', 'topP', 'seed', 'stop', 'stopTokenIds',
    'mode', 'keepRatio', 'signal', 'onText']);
  const unknown = Object.keys(opts).filter((k) => !known.has(k));
  if (unknown.length) {
    throw new InputError(`unknown generation option(s) ${unknown.join(', ')}; known: ${[...known].join(', ')}`);
  }
  const maxNewTokens = opts.maxNewTokens ?? 64;
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) {
    throw new InputError(`maxNewTokens must be a positive integer, got ${JSON.stringify(opts.maxNewTokens)}`);
  }
  for (const k of ['temperature', 'topK', 'topP']) {
    if (opts[k] != null && (typeof opts[k] !== 'number' || !Number.isFinite(opts[k]))) {
      throw new InputError(`${k} must be a finite number, got ${JSON.stringify(opts[k])}`);
    }
  }
  if (opts.greedy != null && typeof opts.greedy !== 'boolean') {
    throw new InputError(`greedy must be true, false or left out, got ${JSON.stringify(opts.greedy)}`);
  }
  const doSample = opts.greedy == null
    ? (opts.temperature != null && opts.temperature > 0) || Boolean(opts.topK) || (opts.topP != null && opts.topP < 1)
    : !opts.greedy;
  const cfg = {
    maxNewTokens,
    doSample,
    temperature: opts.temperature ?? 1,
    topK: opts.topK ?? 0,
    topP: opts.topP ?? 1,
    seed: opts.seed ?? 0,
    stopTokenIds: [...(opts.stopTokenIds ?? [])],
    stop: opts.stop ?? [],
  };
  if (cfg.doSample && !(cfg.temperature > 0)) throw new InputError(`temperature must be > 0 when sampling, got ${cfg.temperature}`);
  if (!Number.isInteger(cfg.seed) || cfg.seed < 0) throw new InputError(`seed must be an integer >= 0, got ${JSON.stringify(cfg.seed)}`);
  if (!Number.isInteger(cfg.topK) || cfg.topK < 0) throw new InputError(`topK must be an integer >= 0, got ${cfg.topK}`);
  if (!(cfg.topP > 0 && cfg.topP <= 1)) throw new InputError(`topP must be in (0, 1], got ${cfg.topP}`);
  if (typeof cfg.stop === 'string' || !Array.isArray(cfg.stop) || !cfg.stop.every((s) => typeof s === 'string')) {
    throw new InputError('stop must be an array of strings; wrap a single string in an array');
  }
  cfg.stop = cfg.stop.filter(Boolean);
  if (!cfg.stopTokenIds.every(Number.isInteger)) throw new InputError('stopTokenIds must be integers');
  return cfg;
}

/** Picks the next id from a logits vector (Float32Array); one per generation. */
export class Sampler {
  constructor(cfg, allowedVocab) {
    this.cfg = cfg;
    this.allowed = allowedVocab;
    this.rng = new Random(cfg.seed);
  }

  pick(logits) {
    const n = Math.min(this.allowed, logits.length);
    if (!this.cfg.doSample) {
      let best = 0;
      for (let i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
      return best;
    }
    const x = new Float64Array(n);
    for (let i = 0; i < n; i++) x[i] = logits[i] / this.cfg.temperature;
    const { topK, topP } = this.cfg;
    if (topK > 0 && topK < n) {
      const kth = Float64Array.from(x).sort()[n - topK];
      for (let i = 0; i < n; i++) if (x[i] < kth) x[i] = -Infinity;
    }
    let max = -Infinity;
    for (const v of x) if (v > max) max = v;
    const p = new Float64Array(n);
    let total = 0;
    for (let i = 0; i < n; i++) total += p[i] = Math.exp(x[i] - max);
    for (let i = 0; i < n; i++) p[i] /= total;
    if (topP < 1) {
      const order = Array.from(p.keys()).sort((a, b) => p[b] - p[a] || a - b);
      let cum = 0;
      let keep = order.length;
      for (let j = 0; j < order.length; j++) {
        cum += p[order[j]];
        if (cum >= topP) {
          keep = j + 1;
          break;
        }
      }
      const kept = new Set(order.slice(0, keep));
      total = 0;
      for (let i = 0; i < n; i++) if (!kept.has(i)) p[i] = 0; else total += p[i];
      for (let i = 0; i < n; i++) p[i] /= total;
    }
    const u = this.rng.random();
    let cum = 0;
    for (let i = 0; i < n; i++) {
      cum += p[i];
      if (u < cum) return i;
    }
    for (let i = n - 1; i >= 0; i--) if (p[i] > 0) return i;
    return 0;
  }
}

/** Python's str.isspace() characters (the set str.lstrip() removes; JS trimStart() differs: it
 * keeps \x1c-\x1f and \x85 and removes \ufeff). */
const LEADING_SPACE = /^[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/;

/** The answer text as the Python runtime gives it (host contract generation.answer_text): the decoded
 * text without leading whitespace (the model's first piece starts with a space). */
export function answerText(decoded) {
  return decoded.replace(LEADING_SPACE, '');
}

/** Incremental detokenization (maven_edge.runtime.pipeline._Detokenizer): emits only complete
 * characters and never text that a stop string may still claim; the pieces join to the final text. */
export class Detokenizer {
  constructor(tokenizer, stopStrings) {
    this.tokenizer = tokenizer;
    this.stopStrings = stopStrings;
    this.ids = [];
    this.emitted = '';
    this.stopped = false;
  }

  trim(text) {
    let cut = -1;
    for (const s of this.stopStrings) {
      const i = text.indexOf(s);
      if (i >= 0 && (cut < 0 || i < cut)) cut = i;
    }
    return cut >= 0 ? [text.slice(0, cut), true] : [text, false];
  }

  holdback(text) {
    let best = 0;
    for (const s of this.stopStrings) {
      for (let n = Math.min(s.length - 1, text.length); n > best; n--) {
        if (text.endsWith(s.slice(0, n))) {
          best = n;
          break;
        }
      }
    }
    return best;
  }

  add(id) {
    this.ids.push(id);
    const [text, hit] = this.trim(answerText(this.tokenizer.decode(this.ids)));
    if (hit) {
      this.stopped = true;
      return this.emit(text);
    }
    let end = text.length;
    while (end > this.emitted.length && text[end - 1] === '\ufffd') end -= 1; // an incomplete UTF-8 sequence
    end -= this.holdback(text.slice(0, end));
    return this.emit(text.slice(0, Math.max(end, this.emitted.length)));
  }

  finish() {
    return this.emit(this.trim(answerText(this.tokenizer.decode(this.ids)))[0]);
  }

  emit(text) {
    if (!text.startsWith(this.emitted)) return '';
    const piece = text.slice(this.emitted.length);
    this.emitted = text;
    return piece;
  }
}
