/**
 * The KV cache takes the manifest's dtype (the decoder's `past_key_values.*` dtype, the recipe's kv_cache):
 * float16 is Uint16Array-backed and zeroed, a bundle that records none (exported before the dtype was
 * recorded) gets float32, anything else is a BundleError at load. The tiny bundle exported with an fp16 cache
 * gives Python's greedy ids on onnxruntime-node here, on the oldest supported one (1.22) in oldest-ort.test.ts
 * (its own process: two onnxruntime-node builds cannot share one), and on onnxruntime-web in browser.test.ts.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import * as ort from "onnxruntime-common";
import type { InferenceSession } from "onnxruntime-common";

import { BundleError, OnnxBackend, type GraphSpec, type OnnxGraphs } from "../src/index.js";
import { loadImage, loadPipeline } from "../src/node.js";
import { need, readJson, vectorPath, type Bundles } from "./vectors.js";

function graphs(dtype: string | null | undefined): OnnxGraphs {
  const kv = [1, 2, "kv_capacity", 8];
  const names = ["past_key_values.0.key", "past_key_values.0.value", "present.0.key", "present.0.value"];
  const dtypes = dtype === undefined ? {} : Object.fromEntries(names.map((n) => [n, dtype]));
  const decoder: GraphSpec = {
    file: "decoder.onnx", dataFiles: [], dtypes,
    inputs: { inputs_embeds: [1, "sequence_length", 16], "past_key_values.0.key": kv, "past_key_values.0.value": kv },
    outputs: { logits: [1, "logits_length", 10], "present.0.key": kv, "present.0.value": kv },
  };
  const other: GraphSpec = { file: "other.onnx", dataFiles: [], inputs: {}, outputs: {}, dtypes: {} };
  return { visionEncoder: other, embedTokens: other, decoder };
}

const noSession = async () => ({ release: async () => {} }) as unknown as InferenceSession;

test("the cache is allocated in the manifest's dtype: float16 as zeroed Uint16Array, none recorded as float32", async () => {
  for (const [recorded, type, array] of [["float16", "float16", Uint16Array], ["float32", "float32", Float32Array],
    [null, "float32", Float32Array], [undefined, "float32", Float32Array]] as const) {
    const backend = await OnnxBackend.create(ort, graphs(recorded), noSession, 16);
    const cache = backend.newCache(5);
    assert.equal(backend.kvDtype, type);
    assert.deepEqual(cache.past.map((t) => [t.type, t.data.constructor, t.dims]), [[type, array, [1, 2, 5, 8]], [type, array, [1, 2, 5, 8]]]);
    assert.ok(cache.past.every((t) => (t.data as Uint16Array | Float32Array).every((x) => x === 0)));
  }
});

test("a KV cache dtype the runtime does not run is a BundleError at load", async () => {
  await assert.rejects(OnnxBackend.create(ort, graphs("int8"), noSession, 16),
    (err: unknown) => err instanceof BundleError && /KV cache dtype "int8"/.test(err.message));
});

interface GenVector { name: string; prompt: string; images: string[]; generated_ids: number[] }

const skipBundle = need("bundles.json", "generation_kv16.json");

test("the tiny bundle with an fp16 cache gives Python's greedy ids on onnxruntime-node", { skip: skipBundle, timeout: 120_000 }, async () => {
  const b = readJson<Bundles>("bundles.json");
  const pipe = await loadPipeline(b.tiny_fp32_kv16!);
  assert.equal(pipe.backend.kvDtype, "float16");
  pipe.eosTokenIds = []; // the vectors decode 32 tokens, EOS ignored
  try {
    for (const v of readJson<GenVector[]>("generation_kv16.json")) {
      const images = await Promise.all(v.images.map((f) => loadImage(vectorPath(f))));
      const content = [...images.map((image) => ({ type: "image" as const, image })), { type: "text" as const, text: v.prompt }];
      const ids: number[] = [];
      for await (const c of pipe.stream({ messages: [{ role: "user", content }], sampling: { maxNewTokens: 32 } })) ids.push(c.tokenId);
      assert.deepEqual(ids, v.generated_ids, v.name);
    }
  } finally {
    await pipe.backend.release();
  }
});
