/** Generation parity (greedy ids for 32 steps on the tiny fp32 bundle) and the generation layers. */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Sampler, streamGenerate, type ChatRequest } from "../src/index.js";
import { loadImage, loadPipeline } from "../src/node.js";
import type { Pipeline } from "../src/pipeline.js";
import { need, readJson, vectorPath, type Bundles } from "./vectors.js";

interface GenVector { name: string; prompt: string; images: string[]; prompt_ids: number[]; generated_ids: number[]; text: string }

const skip = need("generation.json", "bundles.json");

async function request(v: GenVector, sampling: ChatRequest["sampling"] = { maxNewTokens: v.generated_ids.length }): Promise<ChatRequest> {
  const images = await Promise.all(v.images.map((f) => loadImage(vectorPath(f))));
  return { messages: [{ role: "user", content: [...images.map((image) => ({ type: "image" as const, image })), { type: "text" as const, text: v.prompt }] }], sampling };
}

async function ids(pipe: Pipeline, req: ChatRequest, signal?: AbortSignal): Promise<number[]> {
  const out: number[] = [];
  for await (const chunk of pipe.stream(req, signal ? { signal } : {})) out.push(chunk.tokenId);
  return out;
}

describe("generation on the tiny bundle", { skip }, () => {
  const vectors = skip ? [] : readJson<GenVector[]>("generation.json");
  let pipe: Pipeline;
  before(async () => { pipe = await loadPipeline(readJson<Bundles>("bundles.json").tiny_fp32); });
  after(async () => { await pipe?.backend.release(); });

  for (const v of vectors) {
    test(`${v.name}: prompt ids and 32 greedy tokens (EOS ignored) equal Python's, text too`, async () => {
      const req = await request(v);
      assert.deepEqual(pipe.prepare(req).inputIds, v.prompt_ids);
      assert.equal(v.generated_ids.length, 32);
      pipe.eosTokenIds = [];
      try {
        assert.deepEqual(await ids(pipe, req), v.generated_ids);
        assert.equal(await pipe.generate(req), v.text);
      } finally {
        pipe.eosTokenIds = pipe.manifest.eosTokenIds;
      }
    });
  }

  test("max_new_tokens ends the stream with finish reason 'length'", async () => {
    const chunks = [];
    for await (const c of pipe.stream(await request(vectors[0]!, { maxNewTokens: 5 }))) chunks.push(c);
    assert.equal(chunks.length, 5);
    assert.equal(chunks.at(-1)!.finishReason, "length");
    assert.ok(chunks.slice(0, -1).every((c) => c.finishReason === null));
  });

  test("a stop string ends the answer before it", async () => {
    const v = vectors[0]!;
    const full = v.text;
    const stop = full.slice(6, 9);
    assert.ok(stop.length === 3, "the greedy text is long enough to cut");
    const text = await pipe.generate(await request(v, { maxNewTokens: 32, stop: [stop] }));
    assert.equal(text, full.slice(0, full.indexOf(stop)));
  });

  test("an EOS id stops with finish reason 'stop'", async () => {
    const v = vectors[0]!;
    const eos = [v.generated_ids[3]!];
    const chunks = [];
    const steps = (async function* () { for (const token of v.generated_ids) yield { token }; })();
    for await (const c of streamGenerate(steps, pipe.tokenizer, eos, [], 32)) chunks.push(c);
    assert.equal(chunks.length, v.generated_ids.indexOf(eos[0]!) + 1);
    assert.equal(chunks.at(-1)!.finishReason, "stop");
  });

  test("seeded sampling repeats for a seed and differs across seeds", async () => {
    const v = vectors[0]!;
    const sampled = (seed: number) => request(v, { maxNewTokens: 12, temperature: 1.2, topK: 50, topP: 0.95, repetitionPenalty: 1.1, seed });
    const a = await ids(pipe, await sampled(1));
    assert.deepEqual(await ids(pipe, await sampled(1)), a);
    assert.notDeepEqual(await ids(pipe, await sampled(2)), a);
    assert.notDeepEqual(a, v.generated_ids.slice(0, 12));
  });

  test("an AbortSignal cancels the stream at the next step", async () => {
    const controller = new AbortController();
    const got: number[] = [];
    await assert.rejects(async () => {
      for await (const c of pipe.stream(await request(vectors[0]!), { signal: controller.signal })) {
        got.push(c.tokenId);
        if (got.length === 3) controller.abort();
      }
    }, (err: Error) => err.name === "AbortError");
    assert.equal(got.length, 3);
  });
});

describe("sampler", () => {
  const logits = Float32Array.from([0.1, 2.0, 1.9, -1.0]);
  test("greedy is argmax; repetition penalty lowers seen tokens", () => {
    assert.equal(new Sampler({ maxNewTokens: 1 }).sample(logits, []), 1);
    assert.equal(new Sampler({ maxNewTokens: 1, repetitionPenalty: 2 }).sample(logits, [1]), 2);
  });
  test("top-k 1 is greedy at any temperature; top-p keeps the nucleus", () => {
    for (let seed = 0; seed < 20; seed++) {
      assert.equal(new Sampler({ maxNewTokens: 1, temperature: 5, topK: 1, seed }).sample(logits, []), 1);
      assert.ok([1, 2].includes(new Sampler({ maxNewTokens: 1, temperature: 1, topP: 0.6, seed }).sample(logits, [])));
    }
  });
});
