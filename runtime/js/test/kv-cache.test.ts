/**
 * The KV cache takes the manifest's dtype (the decoder's `past_key_values.*` dtype, the recipe's kv_cache):
 * float16 is Uint16Array-backed and zeroed, a bundle that records none (exported before the dtype was
 * recorded) gets float32, anything else is a BundleError at load. No sessions are run here; the real
 * bundles' fp16 cache runs in paris.test.ts (Node), oldest-ort.test.ts (1.22) and browser.test.ts (web).
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import * as ort from "onnxruntime-common";
import type { InferenceSession } from "onnxruntime-common";

import { BundleError, OnnxBackend, type GraphSpec, type OnnxGraphs } from "../src/index.js";

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
