/**
 * The smoledge error tree, mirrored from the Python runtime's `smoledge/errors.py`: the same class names,
 * exit codes and one-line messages ("what was wrong (what to do)"). `test/errors.test.ts` compares them
 * with the messages the Python runtime gives for the same bad inputs (the shared vectors).
 *
 *     SmolEdgeError
 *     ├── ConfigError            bad arguments, bad config
 *     ├── BundleError            a bundle that is missing, incomplete, tampered with or too new
 *     ├── InputError             a request the runtime cannot take
 *     │   ├── ImageError         missing, unreadable or unsupported image
 *     │   │   └── ImageTooLargeError  an image over the byte or pixel limit
 *     │   └── PromptTooLongError prompt + max_new_tokens over the context window
 *     └── BackendError           local inference failed
 *         ├── BackendUnavailableError  the backend cannot run here (e.g. a missing execution provider)
 *         └── DegenerateOutputError    NaN/Inf logits
 *
 * Cancellation through an AbortSignal is not an error of this tree: it rejects with the signal's reason
 * (a DOMException named "AbortError"), as fetch does.
 */

/** Collapse runs of whitespace, as the Python tree does (`" ".join(message.split())`). */
function oneSpace(text: string): string {
  return text.split(/\s+/).filter(Boolean).join(" ");
}

export class SmolEdgeError extends Error {
  readonly exitCode: number = 2;
  readonly detail: string;
  readonly hint: string | undefined;

  constructor(message: string, options: { hint?: string; cause?: unknown } = {}) {
    const detail = oneSpace(message);
    const hint = options.hint ? oneSpace(options.hint) : undefined;
    super(hint ? `${detail} (${hint})` : detail, options.cause === undefined ? undefined : { cause: options.cause });
    this.detail = detail;
    this.hint = hint;
    this.name = new.target.name;
  }
}

export class ConfigError extends SmolEdgeError {}
export class BundleError extends SmolEdgeError {}
export class InputError extends SmolEdgeError {}
export class ImageError extends InputError {}
export class ImageTooLargeError extends ImageError {}
export class PromptTooLongError extends InputError {}
export class BackendError extends SmolEdgeError {}
export class BackendUnavailableError extends BackendError {}
export class DegenerateOutputError extends BackendError {}
