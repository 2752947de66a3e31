/** The real-text INT4 bundle answers the Paris question on Node (greedy), about examples/house.png. */

import assert from "node:assert/strict";
import { test } from "node:test";

import { loadImage, loadPipeline } from "../src/node.js";
import { need, readJson, type Bundles } from "./vectors.js";

const skip = need("bundles.json") || (!readJson<Bundles>("bundles.json").realtext_int4 && "no real-text bundle in the vectors");

test("the real-text INT4 bundle answers Paris on onnxruntime-node", { skip }, async () => {
  const b = readJson<Bundles>("bundles.json");
  const pipe = await loadPipeline(b.realtext_int4!);
  assert.equal(pipe.backend.kvDtype, pipe.manifest.onnx().decoder.dtypes["past_key_values.0.key"] ?? "float32");
  const image = await loadImage(b.house);
  const chunks: string[] = [];
  for await (const c of pipe.stream({ messages: [{ role: "user", content: [{ type: "image", image }, { type: "text", text: b.paris_question }] }], sampling: { maxNewTokens: 24 } })) {
    chunks.push(c.text);
  }
  await pipe.backend.release();
  assert.ok(chunks.length > 1, "streamed in several chunks");
  assert.match(chunks.join(""), /Paris/);
});
