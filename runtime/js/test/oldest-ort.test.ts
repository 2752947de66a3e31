/**
 * The oldest onnxruntime the package supports (package.json's `onnxruntime-node-oldest` alias) loads the
 * bundles (the tiny one also with an fp16 KV cache) and answers as the current one does; the bundle's recorded
 * floor (`runtime.onnxruntime_min`) is not above it.
 */

import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { test } from "node:test";

import type * as Ort from "onnxruntime-node";

import { loadImage, loadPipeline } from "../src/node.js";
import { need, readJson, vectorPath, type Bundles } from "./vectors.js";

const require = createRequire(import.meta.url);
const skip = need("bundles.json", "generation.json");

function version(v: string): number[] {
  return v.split(".").map((n) => Number.parseInt(n, 10));
}

function atMost(a: string, b: string): boolean {
  const [x, y] = [version(a), version(b)];
  for (let i = 0; i < 3; i++) if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) < (y[i] ?? 0);
  return true;
}

test("the oldest supported onnxruntime-node runs the tiny and the real-text bundles", { skip, timeout: 240_000 }, async () => {
  const oldest = (await import("onnxruntime-node-oldest" as string)) as typeof Ort;
  const oldestVersion = (require("onnxruntime-node-oldest/package.json") as { version: string }).version;
  const b = readJson<Bundles>("bundles.json");
  const gen = readJson<{ images: string[]; prompt: string; generated_ids: number[] }[]>("generation.json")[1]!;
  const tiny = await loadPipeline(b.tiny_fp32, { ort: oldest });
  tiny.eosTokenIds = []; // the vectors decode 32 tokens, EOS ignored
  const images = await Promise.all(gen.images.map((f) => loadImage(vectorPath(f))));
  const ids: number[] = [];
  const content = [...images.map((image) => ({ type: "image" as const, image })), { type: "text" as const, text: gen.prompt }];
  for await (const c of tiny.stream({ messages: [{ role: "user", content }], sampling: { maxNewTokens: 32 } })) ids.push(c.tokenId);
  assert.deepEqual(ids, gen.generated_ids);
  await tiny.backend.release();
  if (b.tiny_fp32_kv16) { // the same bundle exported with an fp16 KV cache: Python's ids on that bundle
    const gen16 = readJson<{ images: string[]; prompt: string; generated_ids: number[] }[]>("generation_kv16.json")[1]!;
    const tiny16 = await loadPipeline(b.tiny_fp32_kv16, { ort: oldest });
    tiny16.eosTokenIds = [];
    const images16 = await Promise.all(gen16.images.map((f) => loadImage(vectorPath(f))));
    const content16 = [...images16.map((image) => ({ type: "image" as const, image })), { type: "text" as const, text: gen16.prompt }];
    const ids16: number[] = [];
    for await (const c of tiny16.stream({ messages: [{ role: "user", content: content16 }], sampling: { maxNewTokens: 32 } })) ids16.push(c.tokenId);
    assert.deepEqual(ids16, gen16.generated_ids, "the fp16-cache bundle on the oldest onnxruntime-node");
    await tiny16.backend.release();
  }
  if (!b.realtext_int4) return;
  const pipe = await loadPipeline(b.realtext_int4, { ort: oldest });
  const floor = pipe.manifest.onnxruntimeMin;
  assert.ok(floor && atMost(floor, oldestVersion), `bundle floor ${floor} vs oldest ${oldestVersion}`);
  const house = await loadImage(b.house);
  const text = await pipe.generate({ messages: [{ role: "user", content: [{ type: "image", image: house }, { type: "text", text: b.paris_question }] }], sampling: { maxNewTokens: 24 } });
  await pipe.backend.release();
  assert.match(text, /Paris/);
});
