/**
 * Where the shared vectors are (written by the Python runtime: `runtime/js/python/vectors.py`, run by
 * `tests/test_js_runtime.py`): $SMOLEDGE_JS_VECTORS, else runtime/js/out/vectors. Without them a test is
 * skipped, except under CI=true, where it fails.
 */

import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const PACKAGE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const VECTORS = process.env["SMOLEDGE_JS_VECTORS"] ?? path.join(PACKAGE, "out", "vectors");
export const OUT = path.join(PACKAGE, "out");
export const CI = process.env["CI"] === "true";

/** `false` (run the test) when `files` exist under the vectors folder; a skip reason otherwise; throws under CI. */
export function need(...files: string[]): false | string {
  const missing = files.filter((f) => !existsSync(path.join(VECTORS, f)));
  if (!missing.length) return false;
  const reason = `shared vectors missing in ${VECTORS}: ${missing.join(", ")} (run: make test, or python runtime/js/python/vectors.py ${VECTORS})`;
  if (CI) throw new Error(reason);
  return reason;
}

export function readJson<T>(file: string): T {
  return JSON.parse(readFileSync(path.join(VECTORS, file), "utf8")) as T;
}

export function vectorPath(file: string): string {
  return path.join(VECTORS, file);
}

export interface Bundles {
  tiny_fp32: string;
  /** the tiny fp32 bundle exported with an fp16 KV cache */
  tiny_fp32_kv16?: string;
  realtext_int4?: string;
  paris_question: string;
  house: string;
}
