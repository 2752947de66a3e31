/** The manifest is checked against schema/manifest.schema.json; what the runtime reads comes through manifest.ts. */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";

import { BundleError, parseManifest } from "../src/index.js";
import { need, readJson, type Bundles } from "./vectors.js";

const skip = need("bundles.json");
const manifest = (): Record<string, any> => JSON.parse(readFileSync(path.join(readJson<Bundles>("bundles.json").tiny_fp32, "manifest.json"), "utf8"));

test("a real manifest parses into the typed view", { skip }, () => {
  const m = parseManifest(manifest(), "b");
  assert.equal(m.image.tile_size, 54);
  assert.equal(m.hiddenSize, 64);
  assert.deepEqual(m.formats, ["onnx"]);
  assert.ok(m.onnx().decoder.inputs["past_key_values.0.key"]);
  assert.equal(m.onnx().decoder.dtypes["past_key_values.0.key"], "float32"); // the fp32 recipe's kv_cache
  assert.equal(m.onnx().decoder.dtypes["attention_mask"], "int64");
  assert.match(m.onnxruntimeMin ?? "", /^1\.\d+/);
});

test("schema violations are one BundleError listing every problem", { skip }, () => {
  const m = manifest();
  m["image"]["tile_size"] = "big";
  m["generation"]["eos_token_ids"] = "none";
  assert.throws(() => parseManifest(m, "b"), (err: Error) => {
    assert.ok(err instanceof BundleError);
    assert.match(err.message, /^the manifest of b does not match schema 3: .*\/image\/tile_size must be integer.*\/generation\/eos_token_ids must be array/);
    return true;
  });
});

test("missing sections, no schema_version, not an object", { skip }, () => {
  const m = manifest();
  delete m["tokens"];
  assert.throws(() => parseManifest(m, "b"), /the manifest of b does not match schema 3: \/ must have required property 'tokens'/);
  assert.throws(() => parseManifest({ ...manifest(), schema_version: 1 }, "b"), /uses manifest schema 1, older than this smoledge reads \(3\) \(re-export it/);
  assert.throws(() => parseManifest({ ...manifest(), schema_version: "1" }, "b"), /has no schema_version/);
  assert.throws(() => parseManifest([], "b"), /is not a JSON object/);
  const noOnnx = manifest();
  noOnnx["artifacts"] = {};
  assert.throws(() => parseManifest(noOnnx, "b"), /\/artifacts must NOT have fewer than 1 properties/);
});
