/**
 * The Node CLI (`smoledge-js run`, the package's bin) mirrors `smoledge run`: same greedy ids, a positional
 * prompt, sampling by default, one-line errors with the Python CLI's messages (tests/test_run_cli.py checks
 * the same strings there).
 */

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
  const r = run(readJson<Bundles>("bundles.json").tiny_fp32, ...images, "--prompt", v.prompt, "--max-new-tokens", "32", "--ignore-eos", "--json",
    "--temperature", "0");
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

test("a positional prompt answers as --prompt does; sampling is the default, --temperature 0 greedy", { skip }, () => {
  const bundle = readJson<Bundles>("bundles.json").tiny_fp32;
  const ids = (...args: string[]) => {
    const r = run(bundle, ...args, "--max-new-tokens", "12", "--ignore-eos", "--json");
    assert.equal(r.status, 0, r.stderr);
    return (JSON.parse(r.stdout) as { generated_ids: number[] }).generated_ids;
  };
  const greedy = ids("--prompt", "Describe the sea", "--temperature", "0");
  assert.deepEqual(ids("Describe the sea", "--temperature", "0"), greedy);
  const sampled = ids("Describe the sea", "--seed", "3");
  assert.deepEqual(ids("Describe the sea", "--seed", "3"), sampled);
  assert.notDeepEqual(sampled, greedy);
});

test("no prompt, or two: the Python CLI's one-line messages", { skip }, () => {
  const bundle = readJson<Bundles>("bundles.json").tiny_fp32;
  const none = run(bundle);
  assert.equal(none.status, 2);
  assert.match(none.stderr, /^smoledge-js run: error: no prompt \(smoledge-js run BUNDLE "your question"\)\n$/);
  const both = run(bundle, "hi", "--prompt", "hi");
  assert.equal(both.status, 2);
  assert.equal(both.stderr, "smoledge-js run: error: PROMPT and --prompt both give the prompt (give one)\n");
});

test("piped: the whole answer at the end, and --stats prints llama.cpp's timings", { skip }, () => {
  const bundle = readJson<Bundles>("bundles.json").tiny_fp32;
  const r = run(bundle, "Describe the sea", "--temperature", "0", "--max-new-tokens", "8", "--stats");
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout, r.stdout.trim() + "\n");
  for (const name of ["prompt eval =", "eval =", "total time =", "tokens per second"]) assert.ok(r.stderr.includes(name), r.stderr);
  const quiet = run(bundle, "Describe the sea", "--temperature", "0", "--max-new-tokens", "8", "--no-stream");
  assert.equal(quiet.stdout, r.stdout);
  assert.equal(quiet.stderr, "");
});
