#!/usr/bin/env node
// Batch runner for parity checks (tools/node_parity.py): opens the artifacts once, answers every
// request of a JSON-lines file, writes one JSON line per answer.
//
//   node hosts/node/tools/batch.js --artifacts DIR --requests in.jsonl --out out.jsonl [--threads N]
//
// A request: {"id": ..., "images": [paths], "prompt": "...", "max_new_tokens": 64,
//             "pixels_out": "optional path: the preprocessed float32 [n, 3, H, W] tensor is written there"}.
// An answer: {"id", "token_ids", "text", "finish_reason"} or {"id", "error": {"type", "message"}}.

import fs from 'node:fs';
import readline from 'node:readline';
import { parseArgs } from 'node:util';

import { MavenError, openPipeline, preprocessImages } from '../src/index.js';

const { values: args } = parseArgs({
  options: { artifacts: { type: 'string' }, requests: { type: 'string' }, out: { type: 'string' }, threads: { type: 'string' } },
});
if (!args.artifacts || !args.requests || !args.out) {
  process.stderr.write('usage: batch.js --artifacts DIR --requests in.jsonl --out out.jsonl [--threads N]\n');
  process.exit(2);
}
const pipe = await openPipeline(args.artifacts, { threads: Number(args.threads ?? 1) });
const out = fs.createWriteStream(args.out);
const lines = readline.createInterface({ input: fs.createReadStream(args.requests), crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  const req = JSON.parse(line);
  let answer;
  try {
    if (req.pixels_out) {
      const { data } = await preprocessImages(req.images, pipe.pre, pipe.imageLimits);
      fs.writeFileSync(req.pixels_out, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
    }
    const res = await pipe.generate(req.images, req.prompt, { maxNewTokens: req.max_new_tokens ?? 64 });
    answer = { id: req.id, token_ids: res.tokenIds, text: res.text, finish_reason: res.finishReason };
  } catch (err) {
    if (!(err instanceof MavenError)) throw err;
    answer = { id: req.id, error: { type: err.name, message: err.message } };
  }
  out.write(`${JSON.stringify(answer)}\n`);
}
await new Promise((resolve) => out.end(resolve));
await pipe.release();
