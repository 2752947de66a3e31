/** The Node CLI (`smoledge-js run`, the package's bin) mirrors `smoledge run`: same ids, one-line errors. */

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import path from "node:path";
import { test } from "node:test";

import { PACKAGE, need, readJson, vectorPath, type Bundles } from "./vectors.js";

const CLI = path.join(PACKAGE, "dist", "src", "cli.js");
const skip = need("bundles.json", "generation.json", "errors.json");

function run(...args: string[]) {
  return spawnSync(process.execPath, [CLI, "run", ...args], { encoding: "utf8", timeout: 120_000 });
}

test("run --json gives Python's prompt ids, generated ids and text", { skip }, () => {
  const v = readJson<{ name: string; images: string[]; prompt: string; prompt_ids: number[]; generated_ids: number[]; text: string }[]>("generation.json")[2]!;
  const images = v.images.flatMap((f) => ["--image", vectorPath(f)]);
  const r = run(readJson<Bundles>("bundles.json").tiny_fp32, ...images, "--prompt", v.prompt, "--max-new-tokens", "32", "--ignore-eos", "--json");
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { prompt_ids: number[]; generated_ids: number[]; text: string };
  assert.deepEqual(out.prompt_ids, v.prompt_ids);
  assert.deepEqual(out.generated_ids, v.generated_ids);
  assert.equal(out.text, v.text);
});

test("bad input: one line on stderr, the Python exit code, no stack", { skip }, () => {
  const tampered = readJson<{ case: string; bundle?: string; error: { exit_code: number; message: string } }[]>("errors.json").find((e) => e.case === "bundle-tampered")!;
  const r = run(tampered.bundle!, "--prompt", "hi");
  assert.equal(r.status, tampered.error.exit_code);
  assert.equal(r.stderr, `smoledge-js run: error: ${tampered.error.message}\n`);
  const flag = run(readJson<Bundles>("bundles.json").tiny_fp32, "--prompt", "hi", "--max-new-tokens", "0");
  assert.equal(flag.status, 2);
  assert.match(flag.stderr, /^smoledge-js run: error: --max-new-tokens must be at least 1, got 0\n$/);
});
