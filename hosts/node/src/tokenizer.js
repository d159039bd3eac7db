// The text tokenizer, from tokenizer.json and the manifest's `host.tokenizer` rules
// (core/host_contract.py; docs/hosts.md "Tokenizer"):
//
//   * tokenizer.json is a Hugging Face `tokenizers` byte-level BPE, read with @huggingface/tokenizers;
//   * user text is never matched against special tokens (`match_special_tokens_in_text: false`):
//     the encoder is built from a copy of tokenizer.json without the special added tokens, which is
//     what tokenizers' `encode_special_tokens = True` does in Python; only the literal placeholder
//     (`image_placeholder`) is split out of a prompt, before tokenization;
//   * a prompt is `prompt_prefix` ids, then its text pieces with the placeholder's id between them;
//   * decoding drops ids >= `decode_below` and (with `decode_skip_special_tokens`) the specials.

import fs from 'node:fs/promises';

import { Tokenizer } from '@huggingface/tokenizers';

import { ArtifactError, PromptError } from './errors.js';

export class TextTokenizer {
  /**
   * @param {object} json the parsed tokenizer.json
   * @param {object} manifest the parsed manifest.json (reads vocab and host.tokenizer)
   */
  constructor(json, manifest) {
    const rules = manifest.host.tokenizer;
    this.rules = rules;
    this.specialIds = manifest.vocab.special_ids;
    const added = Array.isArray(json.added_tokens) ? json.added_tokens : [];
    const byContent = new Map(added.map((t) => [t.content, t.id]));
    for (const [name, id] of Object.entries(this.specialIds)) {
      if (byContent.get(name) !== id) {
        throw new ArtifactError(
          `tokenizer.json does not match the vocabulary layout in manifest.json (${name} is ` +
            `${byContent.get(name) ?? 'missing'}, the manifest says ${id}); re-export the artifacts`,
        );
      }
    }
    const size = Object.keys(json.model?.vocab ?? {}).length + added.filter((t) => !(t.content in (json.model?.vocab ?? {}))).length;
    if (size !== manifest.vocab.tokenizer_size) {
      throw new ArtifactError(
        `tokenizer.json has ${size} ids but manifest.json says tokenizer_size ${manifest.vocab.tokenizer_size}; ` +
          're-export the artifacts',
      );
    }
    const options = { clean_up_tokenization_spaces: rules.decode_clean_up_spaces ?? false };
    const encoderJson = rules.match_special_tokens_in_text === false
      ? { ...json, added_tokens: added.filter((t) => !t.special) }
      : json;
    this.encoder = new Tokenizer(encoderJson, options);
    this.decoder = new Tokenizer(json, options);
    this.placeholder = rules.image_placeholder;
    this.imageId = this.idOf(this.placeholder);
    this.prefixIds = (rules.prompt_prefix ?? []).map((name) => this.idOf(name));
    this.decodeBelow = rules.decode_below;
    this.skipSpecial = rules.decode_skip_special_tokens !== false;
    this.addSpecial = rules.add_special_tokens === true;
  }

  static async fromFile(file, manifest) {
    let json;
    try {
      json = JSON.parse(await fs.readFile(file, 'utf8'));
    } catch (err) {
      throw new ArtifactError(`cannot read the tokenizer ${file}: ${err.message}; re-export the artifacts`);
    }
    return new TextTokenizer(json, manifest);
  }

  /** The id of a special token named in the manifest. */
  idOf(name) {
    const id = this.specialIds[name];
    if (!Number.isInteger(id)) {
      throw new ArtifactError(`manifest.json names the token ${JSON.stringify(name)} but vocab.special_ids lacks it`);
    }
    return id;
  }

  /** Plain text to ids; special-token text is encoded literally. */
  encode(text) {
    if (typeof text !== 'string') throw new PromptError(`prompt text must be a string, got ${typeof text}`);
    if (text === '') return [];
    return this.encoder.encode(text, { add_special_tokens: this.addSpecial }).ids;
  }

  /** A prompt to ids: the prefix, then the text pieces with the placeholder id between them. */
  encodePrompt(prompt) {
    if (typeof prompt !== 'string') throw new PromptError(`prompt must be a string, got ${typeof prompt}`);
    const ids = [...this.prefixIds];
    prompt.split(this.placeholder).forEach((piece, i) => {
      if (i) ids.push(this.imageId);
      if (piece) ids.push(...this.encode(piece));
    });
    return ids;
  }

  /** Ids to text; ids at or above decode_below are dropped. */
  decode(ids) {
    const keep = ids.filter((i) => i < this.decodeBelow);
    if (!keep.length) return '';
    return this.decoder.decode(keep, { skip_special_tokens: this.skipSpecial });
  }
}
