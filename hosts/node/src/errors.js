// The error classes of the Node host, mirroring maven_edge.core.errors: every error a caller can
// cause (bad input, bad files, bad options) is one of these, with a message that says what was
// wrong and what to do. The CLI prints them without a stack trace.

export class MavenError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** Bad preprocessing or sampling settings (in the manifest or the options). */
export class ConfigError extends MavenError {}

/** A request that cannot be served: wrong number of images, bad option. */
export class InputError extends MavenError {}

/** An image that cannot be read, is too large, or is not a supported format. */
export class ImageError extends InputError {}

/** A prompt that cannot be served (placeholder mismatch, context overflow, bad text). */
export class PromptError extends InputError {}

/** An artifact directory that is missing files, was tampered with, or that this host cannot run. */
export class ArtifactError extends MavenError {}

/** The generation was stopped by its caller (AbortSignal); `.result` holds the partial result. */
export class GenerationCancelled extends MavenError {}
