#!/usr/bin/env node
// maven-edge (Node host): answer a prompt about images with exported artifacts.
//
//   node hosts/node/bin/maven-edge.js --artifacts DIR --image a.png --image b.png \
//       --prompt $'Image 1: <image>\nImage 2: <image>\nQuestion: which image has a red square?\nAnswer:'
//   node hosts/node/bin/maven-edge.js --artifacts DIR --image a.png --question 'Question: what color is the circle?'
//
// Errors a user can cause are printed as one line (exit 2), never as a stack trace.

import { parseArgs } from 'node:util';

import { MavenError, openPipeline } from '../src/index.js';

const HELP = `usage: maven-edge.js --artifacts DIR [--image PATH ...] (--prompt TEXT | --question TEXT) [options]

Answers a prompt about images with the ONNX files an export wrote (manifest.json + the files it lists).

  --artifacts DIR        the export (manifest.json, the ONNX files, tokenizer.json)
  --image PATH           an image; repeat for several (one per <image> in --prompt, in order)
  --prompt TEXT          the full prompt, one <image> per image
  --question TEXT        a question line (e.g. "Question: what color is the circle?"), put in the
                         prompt layout the model was trained on (the manifest's host.prompt)
  --max-new-tokens N     most tokens to generate (default 64)
  --greedy | --sample    greedy decoding (default) or sampling
  --temperature T        --top-k K  --top-p P  --seed S   sampling settings
  --stop TEXT            stop string (repeat for several)
  --mode MODE            hybrid | discrete | continuous (default: the manifest's)
  --keep-ratio R         hybrid: fraction of patches kept (needs projector.onnx unless it is the exported one)
  --threads N            onnxruntime intra-op threads (0 = its default)
  --no-verify            skip the sha256 check of the files (they are still checked to be listed and inside DIR)
  --stream               print the answer as it is decoded
  --json                 print one JSON object (text, token_ids, finish_reason, timings, ...)
  -h, --help             this help
`;

function fail(message, code = 2) {
  process.stderr.write(`error: ${message}\n`);
  process.exit(code);
}

function number(name, value, integer = false) {
  if (value === undefined) return undefined;
  const x = Number(value);
  if (!Number.isFinite(x) || (integer && !Number.isInteger(x))) fail(`--${name} must be ${integer ? 'an integer' : 'a number'}, got ${JSON.stringify(value)}`);
  return x;
}

async function main() {
  let args;
  try {
    args = parseArgs({
      options: {
        artifacts: { type: 'string' }, image: { type: 'string', multiple: true }, prompt: { type: 'string' },
        question: { type: 'string' }, 'max-new-tokens': { type: 'string' }, greedy: { type: 'boolean' },
        sample: { type: 'boolean' }, temperature: { type: 'string' }, 'top-k': { type: 'string' }, 'top-p': { type: 'string' },
        seed: { type: 'string' }, stop: { type: 'string', multiple: true }, mode: { type: 'string' },
        'keep-ratio': { type: 'string' }, threads: { type: 'string' }, 'no-verify': { type: 'boolean' },
        stream: { type: 'boolean' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: false,
    }).values;
  } catch (err) {
    fail(`${err.message}\n${HELP}`);
  }
  if (args.help) {
    process.stdout.write(HELP);
    return;
  }
  if (!args.artifacts) fail('--artifacts DIR is required (the folder with manifest.json)');
  if ((args.prompt === undefined) === (args.question === undefined)) fail('give exactly one of --prompt and --question');
  if (args.greedy && args.sample) fail('give at most one of --greedy and --sample');
  const images = args.image ?? [];
  const pipe = await openPipeline(args.artifacts, { threads: number('threads', args.threads ?? '0', true), verify: !args['no-verify'] });
  const prompt = args.prompt ?? pipe.buildPrompt(images.length, args.question);
  const options = {
    maxNewTokens: number('max-new-tokens', args['max-new-tokens'] ?? '64', true),
    greedy: args.sample ? false : args.greedy ? true : undefined,
    temperature: number('temperature', args.temperature),
    topK: number('top-k', args['top-k'], true),
    topP: number('top-p', args['top-p']),
    seed: number('seed', args.seed ?? '0', true),
    stop: args.stop ?? [],
    mode: args.mode,
    keepRatio: number('keep-ratio', args['keep-ratio']),
  };
  for (const k of Object.keys(options)) if (options[k] === undefined) delete options[k];
  if (args.stream && !args.json) options.onText = (piece) => process.stdout.write(piece);
  const res = await pipe.generate(images, prompt, options);
  if (args.json) {
    process.stdout.write(`${JSON.stringify({
      text: res.text, token_ids: res.tokenIds, finish_reason: res.finishReason, prompt_tokens: res.promptTokens,
      visual_tokens_per_image: res.visualTokensPerImage, selected_indices: res.selectedIndices, mode: res.mode,
      keep_ratio: res.keepRatio, timings: res.timings, backend: pipe.describe(),
    }, null, 2)}\n`);
  } else if (args.stream) {
    process.stdout.write('\n');
  } else {
    process.stdout.write(`${res.text.trim()}\n`);
  }
  await pipe.release();
}

main().catch((err) => {
  if (err instanceof MavenError) fail(err.message);
  process.stderr.write(`internal error (please report it): ${err?.stack ?? err}\n`);
  process.exit(1);
});
