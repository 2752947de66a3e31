/** Bad inputs give the Python runtime's typed errors: same class name, exit code and message (shared vectors). */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { SmolEdgeError } from "../src/errors.js";
import { loadImage, loadPipeline, openBundle } from "../src/node.js";
import { need, readJson } from "./vectors.js";

interface ErrorVector {
  case: string; image?: string; bundle?: string; prompt?: string; max_new_tokens?: number;
  error: { class: string; exit_code: number; message: string };
}

const skip = need("errors.json");

async function trigger(v: ErrorVector): Promise<void> {
  if (v.image) await loadImage(v.image);
  else if (v.prompt) {
    const pipe = await loadPipeline(v.bundle!, { verify: false });
    try {
      pipe.prepare({ messages: [{ role: "user", content: [{ type: "text", text: v.prompt }] }], sampling: { maxNewTokens: v.max_new_tokens! } });
    } finally {
      await pipe.backend.release();
    }
  } else await openBundle(v.bundle!);
}

describe("errors match the Python runtime's", { skip }, () => {
  const vectors = skip ? [] : readJson<ErrorVector[]>("errors.json");
  test("every bad input of the issue is covered", () => {
    const cases = new Set(vectors.map((v) => v.case));
    for (const c of ["image-garbage.jpg", "bundle-tampered", "bundle-newer-schema", "prompt-too-long"]) assert.ok(cases.has(c), c);
  });
  for (const v of vectors) {
    test(`${v.case}: ${v.error.class}`, async () => {
      await assert.rejects(trigger(v), (err: unknown) => {
        assert.ok(err instanceof SmolEdgeError, String(err));
        assert.equal(err.name, v.error.class);
        assert.equal(err.exitCode, v.error.exit_code);
        assert.equal(err.message, v.error.message);
        return true;
      });
    });
  }
});
