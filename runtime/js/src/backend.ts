/**
 * The ONNX Runtime backend over onnxruntime's JavaScript API, which is one API on Node (onnxruntime-node),
 * in browsers (onnxruntime-web) and in React Native (onnxruntime-react-native): the platform passes in its
 * `ort` module and a way to create each graph's session (a file path on Node, bytes + external data on the web).
 *
 * As the Python `OnnxBackend`: the KV cache is one preallocated [1, kv_heads, capacity, head_dim] tensor per
 * layer and kind, fed as `past_key_values.*` and fetched as `present.*` into the same tensor, so
 * GroupQueryAttention appends in place where the runtime binds the given output buffer (onnxruntime-node);
 * a runtime that returns fresh outputs instead (onnxruntime-web copies to and from its heap) is still
 * correct, as the cache takes whatever `present.*` came back. The cache's dtype is the manifest's (the decoder's
 * `past_key_values.*` dtype; none recorded = float32): a float16 cache is Uint16Array-backed (zeroed, as
 * GroupQueryAttention reads the buffer past the valid length). The decoder computes `logits_to_keep` = 1
 * position's logits, prefill included. The vision encoder runs `visionBatch` tiles per call; execution
 * providers are passed through.
 */

import type { InferenceSession, Tensor } from "onnxruntime-common";

import { BackendError, BundleError } from "./errors.js";
import type { GraphSpec, OnnxGraphs } from "./manifest.js";
import type { StepModel } from "./generate.js";

/** The part of an onnxruntime module (node, web or react-native) the backend uses. */
export interface OrtModule {
  readonly Tensor: typeof Tensor;
}

export type SessionFactory = (graph: GraphSpec, role: keyof OnnxGraphs) => Promise<InferenceSession>;

export interface OnnxOptions {
  /** onnxruntime execution providers, e.g. ["cpu"] (Node), ["wasm"] / ["webgpu"] (web), ["xnnpack"], ["nnapi"], ["coreml"] (RN). */
  readonly executionProviders?: readonly string[];
  /** intra-op threads (0 = onnxruntime's default). */
  readonly threads?: number;
  /** tiles per vision-encoder call (bounds peak memory). */
  readonly visionBatch?: number;
  /** fetch `present.*` into the cache's own tensors (onnxruntime-node binds them in place; default true);
   * false lets the runtime allocate fresh outputs (what onnxruntime-web is given: it copies through its heap). */
  readonly bindOutputs?: boolean;
}

export function sessionOptions(options: OnnxOptions): InferenceSession.SessionOptions {
  return {
    executionProviders: [...(options.executionProviders ?? ["cpu"])],
    graphOptimizationLevel: "all",
    ...(options.threads ? { intraOpNumThreads: options.threads } : {}),
  };
}

/** The KV cache dtypes the decoder may record, and the typed array each is held in. */
const KV_ARRAYS = { float32: Float32Array, float16: Uint16Array } as const;
type KvDtype = keyof typeof KV_ARRAYS;

function kvDtype(recorded: string | null | undefined): KvDtype {
  const dtype = recorded ?? "float32";
  if (!(dtype in KV_ARRAYS)) {
    throw new BundleError(`the decoder's KV cache dtype ${JSON.stringify(dtype)} is not one this runtime runs (${Object.keys(KV_ARRAYS).join(", ")})`,
      { hint: "re-export the bundle with this smoledge" });
  }
  return dtype as KvDtype;
}

export interface KvCache {
  past: Tensor[];
  length: number;
  readonly capacity: number;
  logits: Tensor;
}

export class OnnxBackend implements StepModel<KvCache> {
  private readonly pastNames: string[];
  private readonly presentNames: string[];
  private readonly heads: number;
  private readonly headDim: number;
  private readonly vocabSize: number;
  readonly hiddenSize: number;
  readonly kvDtype: KvDtype;

  private constructor(private readonly ort: OrtModule, private readonly sessions: Record<keyof OnnxGraphs, InferenceSession>,
    graphs: OnnxGraphs, hiddenSize: number, private readonly visionBatch: number,
    private readonly bindOutputs: boolean) {
    this.pastNames = Object.keys(graphs.decoder.inputs).filter((n) => n.startsWith("past_key_values."));
    this.presentNames = Object.keys(graphs.decoder.outputs).filter((n) => n.startsWith("present."));
    const shape = graphs.decoder.inputs[this.pastNames[0]!]!; // [batch, heads, past, head_dim]
    this.heads = Number(shape[1]);
    this.headDim = Number(shape[3]);
    this.vocabSize = Number(graphs.decoder.outputs["logits"]![2]);
    this.kvDtype = kvDtype(graphs.decoder.dtypes[this.pastNames[0]!]);
    this.hiddenSize = hiddenSize;
  }

  static async create(ort: OrtModule, graphs: OnnxGraphs, createSession: SessionFactory, hiddenSize: number,
    options: OnnxOptions = {}): Promise<OnnxBackend> {
    const roles = ["visionEncoder", "embedTokens", "decoder"] as const;
    const made = await Promise.all(roles.map((role) => createSession(graphs[role], role)));
    const sessions = Object.fromEntries(roles.map((role, i) => [role, made[i]!])) as Record<keyof OnnxGraphs, InferenceSession>;
    return new OnnxBackend(ort, sessions, graphs, hiddenSize, Math.max(1, options.visionBatch ?? 4),
      options.bindOutputs ?? true);
  }

  private async run(role: keyof OnnxGraphs, feeds: Record<string, Tensor>,
    fetches?: Record<string, Tensor>): Promise<InferenceSession.ReturnType> {
    try {
      return await (fetches ? this.sessions[role].run(feeds, fetches) : this.sessions[role].run(feeds));
    } catch (err) {
      const message = String((err as Error)?.message ?? err).split("\n")[0]!.slice(0, 200);
      throw new BackendError(`onnxruntime failed in ${role}: ${message}`, { cause: err });
    }
  }

  /** [n,3,H,W] float32 + [n,H,W] bool -> image features [n * image_seq_len * hidden] float32. */
  async encodeImages(pixels: Float32Array, mask: Uint8Array, n: number, height: number, width: number): Promise<Float32Array> {
    const parts: Float32Array[] = [];
    const px = 3 * height * width;
    for (let i = 0; i < n; i += this.visionBatch) {
      const b = Math.min(this.visionBatch, n - i);
      const out = await this.run("visionEncoder", {
        pixel_values: new this.ort.Tensor("float32", pixels.subarray(i * px, (i + b) * px), [b, 3, height, width]),
        pixel_attention_mask: new this.ort.Tensor("bool", mask.subarray(i * height * width, (i + b) * height * width), [b, height, width]),
      });
      parts.push(Object.values(out)[0]!.data as Float32Array);
    }
    return concat(parts);
  }

  async embed(ids: readonly number[]): Promise<Float32Array> {
    const input = new this.ort.Tensor("int64", BigInt64Array.from(ids, (i) => BigInt(i)), [1, ids.length]);
    const out = await this.run("embedTokens", { input_ids: input });
    return Object.values(out)[0]!.data as Float32Array;
  }

  /** Buffers for `capacity` positions (the prompt plus the new tokens), allocated once, zeroed, in the manifest's dtype. */
  newCache(capacity: number): KvCache {
    const TypedArray = KV_ARRAYS[this.kvDtype];
    const past = this.pastNames.map(() => new this.ort.Tensor(this.kvDtype, new TypedArray(this.heads * capacity * this.headDim),
      [1, this.heads, capacity, this.headDim]));
    const logits = new this.ort.Tensor("float32", new Float32Array(this.vocabSize), [1, 1, this.vocabSize]);
    return { past, length: 0, capacity, logits };
  }

  /** Run the decoder on [1,S,hidden] after what `cache` holds; returns the last position's logits (a copy). */
  async step(inputsEmbeds: Float32Array, cache: KvCache): Promise<Float32Array> {
    const seq = inputsEmbeds.length / this.hiddenSize;
    const total = cache.length + seq;
    if (total > cache.capacity) {
      throw new BackendError(`the KV cache holds ${cache.capacity} positions; this step needs ${total}`);
    }
    const feeds: Record<string, Tensor> = {
      inputs_embeds: new this.ort.Tensor("float32", inputsEmbeds, [1, seq, this.hiddenSize]),
      attention_mask: new this.ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
      logits_to_keep: new this.ort.Tensor("int64", BigInt64Array.of(1n), [1]),
    };
    const fetches: Record<string, Tensor> = { logits: cache.logits };
    this.pastNames.forEach((name, i) => { feeds[name] = cache.past[i]!; fetches[this.presentNames[i]!] = cache.past[i]!; });
    const out = await this.run("decoder", feeds, this.bindOutputs ? fetches : undefined);
    cache.past = this.presentNames.map((name) => out[name]!);
    cache.logits = out["logits"]!;
    cache.length = total;
    return (cache.logits.data as Float32Array).slice(0, this.vocabSize);
  }

  async release(): Promise<void> {
    await Promise.all(Object.values(this.sessions).map((s) => s.release()));
  }
}

function concat(parts: Float32Array[]): Float32Array {
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) { out.set(p, offset); offset += p.length; }
  return out;
}
