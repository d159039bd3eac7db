// manifest.json: the only thing the host reads besides the files it lists (docs/design.md §4,
// docs/hosts.md). Loading checks, like maven_edge.core.manifest.load_manifest: the format
// version, the fields the host reads, that every listed file is inside the artifact directory
// (no absolute paths, no `..`, no symlink escape), each file's size and sha256, and that every
// external-data location written inside an ONNX file is one of the files listed for it.

import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';

import { ArtifactError } from './errors.js';

export const MANIFEST = 'manifest.json';
/** The manifest format versions this host reads. */
export const FORMAT_VERSION = 1;
/** The `host` section versions this host reads (core/host_contract.py). */
export const HOST_CONTRACT_VERSION = 2;
export const COMPONENTS = ['vision_encoder', 'discrete_tokenizer', 'embed_tokens', 'patch_selector', 'decoder'];

const REEXPORT = 're-export the artifacts with `maven-edge export`';

/** sha256 of a file, streamed. */
export async function sha256File(file) {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk);
  return hash.digest('hex');
}

/** `directory/relative`, refusing absolute paths and anything that resolves outside `directory`. */
export async function resolveInside(directory, relative) {
  if (typeof relative !== 'string' || relative === '' || path.isAbsolute(relative) || relative.includes('\0')) {
    throw new ArtifactError(`manifest entry ${JSON.stringify(relative)} is not a relative path; refusing to read it`);
  }
  const root = await fs.realpath(directory);
  const lexical = path.resolve(root, relative);
  let target = lexical;
  try {
    target = await fs.realpath(lexical);
  } catch {
    // missing: reported by the caller; the lexical path must still stay inside
  }
  for (const candidate of [lexical, target]) {
    const rel = path.relative(root, candidate);
    if (rel === '' || rel.startsWith('..') || path.isAbsolute(rel)) {
      throw new ArtifactError(
        `manifest entry ${JSON.stringify(relative)} points outside the artifact directory ${root}; refusing to read it`,
      );
    }
  }
  return target;
}

function fail(file, problem) {
  throw new ArtifactError(`${file} does not follow the manifest schema: ${problem}; ${REEXPORT}`);
}

function checkEntry(file, where, e) {
  if (!e || typeof e !== 'object') fail(file, `${where} is missing`);
  if (typeof e.path !== 'string') fail(file, `${where}.path must be a string`);
  if (typeof e.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(e.sha256)) fail(file, `${where}.sha256 must be a hex digest`);
  if (!Number.isInteger(e.size_bytes) || e.size_bytes < 0) fail(file, `${where}.size_bytes must be an integer`);
}

function checkFields(file, m) {
  for (const [key, type] of Object.entries({
    preset: 'string', config: 'object', vocab: 'object', preprocess: 'object', mode: 'string',
    keep_ratio: 'number', num_patches: 'number', num_kept_patches: 'number', components: 'object',
    tokenizer: 'object', recipe: 'string',
  })) {
    if (typeof m[key] !== type || m[key] === null) fail(file, `${key} is ${m[key] === null ? 'null' : typeof m[key]}, expected ${type}`);
  }
  for (const key of ['text_vocab_size', 'tokenizer_size', 'codebook_size']) {
    if (!Number.isInteger(m.vocab[key])) fail(file, `vocab.${key} must be an integer`);
  }
  const special = m.vocab.special_ids;
  if (!special || typeof special !== 'object' || !Object.values(special).every(Number.isInteger)) {
    fail(file, 'vocab.special_ids must map token names to integer ids');
  }
  checkEntry(file, 'tokenizer', m.tokenizer);
  const missing = COMPONENTS.filter((name) => !(name in m.components));
  if (missing.length) throw new ArtifactError(`${file} lacks component(s) ${missing.join(', ')}; ${REEXPORT}`);
  for (const [name, c] of Object.entries(m.components)) {
    if (!c || typeof c !== 'object') fail(file, `components.${name} is not an object`);
    checkEntry(file, `components.${name}.file`, c.file);
    for (const [i, e] of (c.external_data ?? []).entries()) checkEntry(file, `components.${name}.external_data[${i}]`, e);
    if (!Array.isArray(c.inputs) || !Array.isArray(c.outputs)) fail(file, `components.${name} must list inputs and outputs`);
  }
  if (!m.host || typeof m.host !== 'object' || Object.keys(m.host).length === 0) {
    throw new ArtifactError(
      `${file} has no "host" section (it was exported before maven-edge wrote one). Add it without re-exporting: ` +
        '`python -m maven_edge.core.host_contract ARTIFACT_DIR`, or re-export the artifacts',
    );
  }
  if (m.host.version !== HOST_CONTRACT_VERSION) {
    throw new ArtifactError(
      `${file} has host contract version ${JSON.stringify(m.host.version)}; this host reads version ` +
        `${HOST_CONTRACT_VERSION}. Rewrite the section in place with \`python -m maven_edge.core.host_contract ` +
        'ARTIFACT_DIR` (version 2 resizes images before padding them), or re-export the artifacts',
    );
  }
}

// An ONNX TensorProto's external-data entry is a StringStringEntryProto {key: "location", value}:
// field 1 (tag 0x0a) length 8 "location", then field 2 (tag 0x12) a varint length and the value.
const LOCATION_KEY = Buffer.from([0x0a, 0x08, ...Buffer.from('location')]);

/** The external-data locations written inside an ONNX file (a scan for the entry's bytes). */
export function externalDataLocations(bytes) {
  const found = new Set();
  let at = bytes.indexOf(LOCATION_KEY);
  while (at >= 0) {
    let p = at + LOCATION_KEY.length;
    if (bytes[p] === 0x12) {
      p += 1;
      let len = 0;
      let shift = 0;
      while (p < bytes.length && shift < 35) {
        const b = bytes[p++];
        len += (b & 0x7f) * 2 ** shift;
        shift += 7;
        if (!(b & 0x80)) break;
      }
      if (p + len <= bytes.length) found.add(bytes.subarray(p, p + len).toString('utf8'));
    }
    at = bytes.indexOf(LOCATION_KEY, at + 1);
  }
  return [...found];
}

/** externalDataLocations over a whole file, read in chunks (ONNX files may be gigabytes). */
async function fileExternalDataLocations(file) {
  const found = new Set();
  const keep = 8192; // overlap between chunks: an entry (key + value) is shorter than this
  let tail = Buffer.alloc(0);
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 24 })) {
    const buf = Buffer.concat([tail, chunk]);
    for (const loc of externalDataLocations(buf)) found.add(loc);
    tail = buf.subarray(Math.max(0, buf.length - keep));
  }
  return [...found];
}

/**
 * Read and check `directory/manifest.json`. With `verify` (the default), every file's sha256 is
 * checked against the manifest. Returns { manifest, directory, files: {component: absolute path},
 * tokenizerPath }.
 */
export async function loadManifest(directory, { verify = true } = {}) {
  const file = path.join(directory, MANIFEST);
  let text;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if (err.code === 'ENOENT' || err.code === 'ENOTDIR') {
      throw new ArtifactError(
        `${directory} has no ${MANIFEST}; export one with \`maven-edge export --checkpoint DIR --out ${directory}\``,
      );
    }
    throw new ArtifactError(`cannot read ${file}: ${err.message}`);
  }
  let m;
  try {
    m = JSON.parse(text);
  } catch (err) {
    throw new ArtifactError(`${file} is not valid JSON: ${err.message}`);
  }
  if (!m || typeof m !== 'object' || !('format_version' in m)) {
    throw new ArtifactError(`${file} is not a maven-edge manifest (no format_version)`);
  }
  if (!Number.isInteger(m.format_version) || m.format_version > FORMAT_VERSION) {
    throw new ArtifactError(
      `${file} has format version ${JSON.stringify(m.format_version)}; this host reads up to ${FORMAT_VERSION}. ` +
        'Upgrade the host or re-export with the matching maven-edge',
    );
  }
  checkFields(file, m);
  const entries = [['tokenizer', m.tokenizer]];
  for (const [name, c] of Object.entries(m.components)) {
    entries.push([name, c.file]);
    for (const e of c.external_data ?? []) entries.push([`${name} external data`, e]);
  }
  const resolved = new Map();
  for (const [, e] of entries) {
    const target = await resolveInside(directory, e.path);
    let stat;
    try {
      stat = await fs.stat(target);
    } catch {
      stat = null;
    }
    if (!stat || !stat.isFile()) {
      throw new ArtifactError(`artifact file ${e.path} listed in ${MANIFEST} is missing from ${directory}; ${REEXPORT}`);
    }
    if (verify && (stat.size !== e.size_bytes || (await sha256File(target)) !== e.sha256)) {
      throw new ArtifactError(
        `artifact file ${e.path} does not match the sha256 in ${MANIFEST}: it was modified or corrupted; ${REEXPORT}`,
      );
    }
    resolved.set(e.path, target);
  }
  const files = {};
  for (const [name, c] of Object.entries(m.components)) {
    const onnxPath = resolved.get(c.file.path);
    const listed = new Set((c.external_data ?? []).map((e) => resolved.get(e.path)));
    for (const loc of await fileExternalDataLocations(onnxPath)) {
      let target;
      try {
        target = await resolveInside(directory, path.join(path.dirname(c.file.path), loc));
      } catch {
        throw new ArtifactError(
          `${c.file.path} references external data ${JSON.stringify(loc)} outside the artifact directory; refusing to ` +
            `load it (the file was tampered with): ${REEXPORT}`,
        );
      }
      if (!listed.has(target)) {
        throw new ArtifactError(
          `${c.file.path} references external data ${JSON.stringify(loc)} that ${MANIFEST} does not list for it; ` +
            `refusing to load unverified data: ${REEXPORT}`,
        );
      }
    }
    files[name] = onnxPath;
  }
  return { manifest: m, directory, files, tokenizerPath: resolved.get(m.tokenizer.path) };
}
