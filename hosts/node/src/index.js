// maven-edge Node host: run exported maven-edge artifacts from manifest.json alone.
//
//   import { openPipeline } from '@maven-edge/node-host';
//   const pipe = await openPipeline('artifacts/tiny', { threads: 2 });
//   const res = await pipe.generate(['a.png', 'b.png'], pipe.buildPrompt(2, 'Question: which image has a red square?'));
//   res.text, res.tokenIds, res.timings
//
// See hosts/node/README.md for the API and docs/hosts.md for the contract.

export { MavenPipeline, openPipeline } from './pipeline.js';
export { loadManifest, sha256File, MANIFEST, FORMAT_VERSION, HOST_CONTRACT_VERSION } from './manifest.js';
export { TextTokenizer } from './tokenizer.js';
export { decodeImage, padToSquare, preprocessImages, preprocessSpec, toPixelValues, DEFAULT_IMAGE_LIMITS } from './image.js';
export { resize, RESAMPLE_NAMES } from './resample.js';
export { Sampler, Detokenizer, answerText, generationConfig } from './sampling.js';
export {
  MavenError, ConfigError, InputError, ImageError, PromptError, ArtifactError, GenerationCancelled,
} from './errors.js';
