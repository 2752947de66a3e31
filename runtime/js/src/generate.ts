/**
 * Generation in three layers, as the Python runtime's `runtime/generate.py`:
 *
 * 1. `generateStep` yields `{ token, logits }`: prefill once, then one decoder step per token (KV cache).
 * 2. `streamGenerate` yields `StreamChunk`s: detokenised text, EOS ids, stop strings, `maxNewTokens`.
 * 3. `generateText` returns the whole answer.
 *
 * Greedy decoding is the same arithmetic as Python's (argmax over float64, repetition penalty first), so the
 * tokens match. Seeded sampling is reproducible for a seed here, but draws from its own generator
 * (xoshiro128**), not numpy's: the same seed gives different samples in the two runtimes.
 * Cancellation: an `AbortSignal` is checked before every decoder step.
 */

import { DegenerateOutputError } from "./errors.js";

export interface SamplingConfig {
  readonly maxNewTokens: number;
  readonly temperature?: number;
  readonly topK?: number;
  readonly topP?: number;
  readonly repetitionPenalty?: number;
  readonly seed?: number;
  readonly stop?: readonly string[];
}

export interface StreamChunk {
  readonly text: string;
  readonly tokenId: number;
  readonly finishReason: "stop" | "length" | null;
}

/** What generation needs from a backend: embed ids, and run one decoder step on embeddings. */
export interface StepModel<Cache> {
  embed(ids: readonly number[]): Promise<Float32Array>;
  step(inputsEmbeds: Float32Array, cache: Cache): Promise<Float32Array>;
}

export interface Detokenizer {
  decode(ids: number[], options: { skip_special_tokens: boolean; clean_up_tokenization_spaces: boolean }): string;
}

/** xoshiro128** seeded through splitmix32: a small, well-tested generator with a 2^128 period. */
function rng(seed: number): () => number {
  let x = seed >>> 0;
  const next32 = (): number => {
    x = (x + 0x9e3779b9) >>> 0;
    let z = x;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
  const s = [next32(), next32(), next32(), next32()];
  return () => {
    const result = Math.imul(((Math.imul(s[1]!, 5) << 7) | (Math.imul(s[1]!, 5) >>> 25)) >>> 0, 9) >>> 0;
    const t = (s[1]! << 9) >>> 0;
    s[2]! ^= s[0]!; s[3]! ^= s[1]!; s[1]! ^= s[2]!; s[0]! ^= s[3]!; s[2]! ^= t;
    s[3] = ((s[3]! << 11) | (s[3]! >>> 21)) >>> 0;
    return result / 4294967296;
  };
}

export class Sampler {
  private readonly random: () => number;

  constructor(readonly config: SamplingConfig) {
    this.random = rng(config.seed ?? Math.floor(Math.random() * 2 ** 32));
  }

  sample(logitsIn: Float32Array, history: readonly number[]): number {
    const { temperature = 0, topK = 0, topP = 1, repetitionPenalty = 1 } = this.config;
    const logits = Float64Array.from(logitsIn);
    if (repetitionPenalty !== 1 && history.length) {
      for (const id of new Set(history)) {
        const v = logits[id]!;
        logits[id] = v > 0 ? v / repetitionPenalty : v * repetitionPenalty;
      }
    }
    if (temperature <= 0) return argmax(logits);
    for (let i = 0; i < logits.length; i++) logits[i]! /= temperature;
    if (topK && topK < logits.length) {
      const kth = Float64Array.from(logits).sort()[logits.length - topK]!;
      for (let i = 0; i < logits.length; i++) if (logits[i]! < kth) logits[i] = -Infinity;
    }
    const max = logits.reduce((a, b) => Math.max(a, b), -Infinity);
    const probs = logits.map((v) => Math.exp(v - max));
    normalise(probs);
    if (topP < 1) {
      const order = [...probs.keys()].sort((a, b) => probs[b]! - probs[a]!);
      let cumulative = 0;
      let keep = order.length;
      for (let i = 0; i < order.length; i++) {
        cumulative += probs[order[i]!]!;
        if (cumulative >= topP) { keep = i + 1; break; }
      }
      for (const id of order.slice(keep)) probs[id] = 0;
      normalise(probs);
    }
    let u = this.random();
    for (let i = 0; i < probs.length; i++) {
      u -= probs[i]!;
      if (u < 0) return i;
    }
    return probs.findLastIndex((p) => p > 0);
  }
}

function normalise(p: Float64Array): void {
  const sum = p.reduce((a, b) => a + b, 0);
  for (let i = 0; i < p.length; i++) p[i]! /= sum;
}

function argmax(v: Float64Array): number {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i]! > v[best]!) best = i;
  return best;
}

function checkAbort(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw signal.reason ?? new DOMException("generation cancelled", "AbortError");
}

/** Layer 1: prefill `promptEmbeds`, then decode; yields each token with the logits it came from. */
export async function* generateStep<Cache>(model: StepModel<Cache>, promptEmbeds: Float32Array, cache: Cache, sampler: Sampler,
  maxNewTokens: number, signal?: AbortSignal): AsyncGenerator<{ token: number; logits: Float32Array }> {
  const history: number[] = [];
  checkAbort(signal);
  let logits = await model.step(promptEmbeds, cache);
  for (;;) {
    if (!logits.every(Number.isFinite)) {
      throw new DegenerateOutputError(`the model produced NaN/Inf logits at step ${history.length}`,
        { hint: "the bundle's weights or the backend are broken; re-export" });
    }
    const token = sampler.sample(logits, history);
    history.push(token);
    yield { token, logits };
    if (history.length >= maxNewTokens) return;
    checkAbort(signal);
    logits = await model.step(await model.embed([token]), cache);
  }
}

/** Text for a growing list of ids, released only once its UTF-8 characters are complete. */
class IncrementalDecoder {
  private readonly ids: number[] = [];
  text = "";

  constructor(private readonly tokenizer: Detokenizer) {}

  add(token: number): void {
    this.ids.push(token);
    const full = this.tokenizer.decode(this.ids, { skip_special_tokens: true, clean_up_tokenization_spaces: false });
    if (!full.endsWith("\ufffd")) this.text = full;
  }
}

/** How many trailing characters could still grow into a stop string. */
function heldBack(text: string, stops: readonly string[]): number {
  let hold = 0;
  for (const stop of stops) {
    for (let n = Math.min(stop.length - 1, text.length); n > 0; n--) {
      if (text.endsWith(stop.slice(0, n))) { hold = Math.max(hold, n); break; }
    }
  }
  return hold;
}

/** Layer 2: tokens -> text chunks, ending on an EOS id, a stop string or `maxNewTokens`. */
export async function* streamGenerate(steps: AsyncIterable<{ token: number }>, tokenizer: Detokenizer, eosIds: Iterable<number>,
  stop: readonly string[] = [], maxNewTokens = 256): AsyncGenerator<StreamChunk> {
  const eos = new Set(eosIds);
  const decoder = new IncrementalDecoder(tokenizer);
  let sent = 0;
  let count = 0;
  for await (const { token } of steps) {
    count += 1;
    if (eos.has(token)) {
      yield { text: decoder.text.slice(sent), tokenId: token, finishReason: "stop" };
      return;
    }
    decoder.add(token);
    const text = decoder.text;
    const hits = stop.map((s) => text.indexOf(s, sent)).filter((i) => i >= 0);
    if (hits.length) {
      yield { text: text.slice(sent, Math.min(...hits)), tokenId: token, finishReason: "stop" };
      return;
    }
    if (count >= maxNewTokens) {
      yield { text: text.slice(sent), tokenId: token, finishReason: "length" };
      return;
    }
    const upto = text.length - heldBack(text, stop);
    yield { text: upto > sent ? text.slice(sent, upto) : "", tokenId: token, finishReason: null };
    sent = Math.max(sent, upto);
  }
}

/** Layer 3: the whole answer. */
export async function generateText(chunks: AsyncIterable<StreamChunk>): Promise<string> {
  let out = "";
  for await (const chunk of chunks) out += chunk.text;
  return out;
}
