/**
 * A loaded bundle that answers chat requests, platform-free: the manifest, a tokenizer and an ONNX backend
 * come in (see `node.ts` and `web.ts` for how each platform builds them); images come in as RGB pixels.
 * `prepare` -> prompt ids + vision input, `stream` -> an async iterator of chunks, `generate` -> the text.
 */

import { Tokenizer } from "@huggingface/tokenizers";

import { InputError, PromptTooLongError } from "./errors.js";
import { Sampler, generateStep, generateText, streamGenerate, type SamplingConfig, type StreamChunk } from "./generate.js";
import type { RgbImage } from "./image/types.js";
import type { Manifest } from "./manifest.js";
import { OnnxBackend, type OnnxOptions, type OrtModule, type SessionFactory } from "./backend.js";
import { preprocess, type ProcessedImages } from "./preprocess.js";
import { addSpecialTokensFor, buildPrompt, type Message } from "./prompt.js";

export interface ChatRequest {
  readonly messages: readonly Message<RgbImage>[];
  readonly sampling?: Partial<SamplingConfig>;
}

export interface Prepared {
  readonly inputIds: number[];
  readonly images: ProcessedImages | undefined;
}

export interface GenerationStats {
  promptTokens: number;
  completionTokens: number;
  imageTiles: number;
  timeToFirstTokenMs: number;
  totalMs: number;
}

export class Pipeline {
  lastStats: GenerationStats = { promptTokens: 0, completionTokens: 0, imageTiles: 0, timeToFirstTokenMs: 0, totalMs: 0 };

  /** The ids that end an answer (the manifest's); empty to decode exactly `maxNewTokens` (benchmarks). */
  eosTokenIds: readonly number[];

  constructor(readonly manifest: Manifest, readonly tokenizer: Tokenizer, readonly backend: OnnxBackend) {
    this.eosTokenIds = manifest.eosTokenIds;
  }

  /**
   * A pipeline from parts any platform can provide (React Native included): the parsed manifest, the parsed
   * tokenizer.json, an onnxruntime module and a function that creates each graph's session.
   */
  static async create(manifest: Manifest, tokenizerJson: object, ort: OrtModule, createSession: SessionFactory,
    options: OnnxOptions = {}): Promise<Pipeline> {
    const backend = await OnnxBackend.create(ort, manifest.onnx(), createSession, manifest.hiddenSize, options);
    return new Pipeline(manifest, new Tokenizer(tokenizerJson, {}), backend);
  }

  /** The prompt's token ids for these messages, given each image's tile grid. */
  promptIds(messages: ChatRequest["messages"], images: ProcessedImages | undefined): number[] {
    const m = this.manifest;
    const prompt = buildPrompt(messages, images?.grids ?? [], m.chatTemplate, m.tokens, m.image.image_seq_len);
    return this.tokenizer.encode(prompt, { add_special_tokens: addSpecialTokensFor(prompt, m.tokens.bos_token) }).ids;
  }

  sampling(request: ChatRequest): SamplingConfig {
    return { maxNewTokens: this.manifest.maxNewTokens, ...request.sampling };
  }

  prepare(request: ChatRequest): Prepared {
    if (!request.messages.some((m) => m.content.length)) throw new InputError("the request has no content", { hint: "give a prompt" });
    const pictures = request.messages.flatMap((m) => m.content.flatMap((p) => (p.type === "image" ? [p.image] : [])));
    const images = pictures.length ? preprocess(pictures, this.manifest.image) : undefined;
    const inputIds = this.promptIds(request.messages, images);
    const maxNew = this.sampling(request).maxNewTokens;
    const total = inputIds.length + maxNew;
    if (total > this.manifest.contextLength) {
      throw new PromptTooLongError(
        `prompt (${inputIds.length} tokens) + max_new_tokens (${maxNew}) = ${total} exceeds the model's context window of ${this.manifest.contextLength}`,
        { hint: "shorten the prompt, use fewer/smaller images, fewer video frames (--max-frames) or lower --max-new-tokens" });
    }
    return { inputIds, images };
  }

  /** The prompt's embeddings with every `<image>` slot filled by the vision encoder's features. */
  async promptEmbeds(prepared: Prepared): Promise<Float32Array> {
    const embeds = await this.backend.embed(prepared.inputIds);
    const images = prepared.images;
    if (!images) return embeds;
    const features = await this.backend.encodeImages(images.pixelValues, images.pixelAttentionMask, images.nTiles, images.height, images.width);
    const hidden = this.backend.hiddenSize;
    const imageId = this.manifest.tokens.image_token_id;
    const slots = prepared.inputIds.flatMap((id, i) => (id === imageId ? [i] : []));
    if (slots.length * hidden !== features.length) {
      throw new InputError(`the prompt has ${slots.length} image slots for ${features.length / hidden} image features`,
        { hint: "the prompt must not contain the literal image token text" });
    }
    const out = embeds.slice();
    slots.forEach((slot, k) => out.set(features.subarray(k * hidden, (k + 1) * hidden), slot * hidden));
    return out;
  }

  /** The answer as an async iterator of chunks; `signal` cancels it before the next decoder step. */
  async *stream(request: ChatRequest, options: { signal?: AbortSignal } = {}): AsyncGenerator<StreamChunk> {
    const start = performance.now();
    const stats: GenerationStats = (this.lastStats = { promptTokens: 0, completionTokens: 0, imageTiles: 0, timeToFirstTokenMs: 0, totalMs: 0 });
    const prepared = this.prepare(request);
    stats.promptTokens = prepared.inputIds.length;
    stats.imageTiles = prepared.images?.nTiles ?? 0;
    const embeds = await this.promptEmbeds(prepared);
    const cfg = this.sampling(request);
    const steps = generateStep(this.backend, embeds, this.backend.newCache(prepared.inputIds.length + cfg.maxNewTokens), new Sampler(cfg), cfg.maxNewTokens, options.signal);
    for await (const chunk of streamGenerate(steps, this.tokenizer, this.eosTokenIds, cfg.stop ?? [], cfg.maxNewTokens)) {
      stats.completionTokens += 1;
      if (stats.completionTokens === 1) stats.timeToFirstTokenMs = performance.now() - start;
      stats.totalMs = performance.now() - start;
      yield chunk;
    }
  }

  generate(request: ChatRequest, options: { signal?: AbortSignal } = {}): Promise<string> {
    return generateText(this.stream(request, options));
  }
}
