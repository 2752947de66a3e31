#!/usr/bin/env node
/**
 * `smoledge-js run BUNDLE [PROMPT] [--image IMG]... [--prompt TEXT] [--max-new-tokens N] [--json] [--no-stream]`,
 * mirroring `smoledge run`: a positional prompt, the answer streamed on a terminal, the same sampling defaults
 * (the checkpoint's generation_config from the manifest, else temperature 0.8, top-k 40, top-p 0.95, repetition
 * penalty 1.1; `--temperature 0` is greedy and gives Python's tokens), `--stats` timings on stderr (on by
 * default when stderr is a terminal). `--json` prints the prompt ids, generated ids and text. Errors: one line
 * `smoledge-js run: error: MESSAGE (HINT)` with the Python CLI's message and exit code (2); `--debug` shows
 * the stack.
 */

import { parseArgs } from "node:util";

import { ConfigError, SmolEdgeError } from "./errors.js";
import { loadImage, loadPipeline } from "./node.js";
import type { GenerationStats } from "./pipeline.js";
import type { Message } from "./prompt.js";
import type { RgbImage } from "./image/types.js";

const USAGE = `usage: smoledge-js run BUNDLE [PROMPT] [--prompt TEXT] [--image IMG]... [--system TEXT] [--max-new-tokens N]
                   [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S] [--stop STR]...
                   [--providers cpu,...] [--threads N] [--stream | --no-stream] [--stats | --no-stats] [--json]
                   [--ignore-eos] [--no-verify] [--debug]`;

/** Where a flag is not given: `smoledge run`'s defaults (smoledge/runtime/defaults.py, CLI). */
const CLI_SAMPLING = { temperature: 0.8, topK: 40, topP: 0.95, repetitionPenalty: 1.1 } as const;

/**
 * The CLI defaults with what the checkpoint's generation_config sets (the manifest's generation.checkpoint);
 * greedy (temperature 0) turns the default repetition penalty off, so it is the library's greedy exactly.
 */
function samplingDefaults(raw: Readonly<Record<string, unknown>>, temperature: number | undefined): { temperature: number; topK: number; topP: number; repetitionPenalty: number } {
  const own = ((raw["generation"] as Record<string, unknown> | undefined)?.["checkpoint"] ?? {}) as Record<string, number | null>;
  const t = temperature ?? own["temperature"] ?? CLI_SAMPLING.temperature;
  return {
    temperature: t, topK: own["top_k"] ?? CLI_SAMPLING.topK, topP: own["top_p"] ?? CLI_SAMPLING.topP,
    repetitionPenalty: own["repetition_penalty"] ?? (t <= 0 ? 1 : CLI_SAMPLING.repetitionPenalty),
  };
}

/** PROMPT or --prompt, with `smoledge run`'s messages for none and for both. */
function promptOf(positional: string | undefined, flag: string | undefined): string {
  if (positional !== undefined && flag !== undefined) throw new ConfigError("PROMPT and --prompt both give the prompt", { hint: "give one" });
  const prompt = positional ?? flag;
  if (prompt === undefined) throw new ConfigError("no prompt", { hint: 'smoledge-js run BUNDLE "your question"' });
  return prompt;
}

function timings(s: GenerationStats): string {
  const line = (name: string, n: number, ms: number, unit: string) => `${name.padStart(12)} = ${ms.toFixed(2).padStart(10)} ms / ${String(n).padStart(5)} ${unit} (${
    n ? `${(ms / n).toFixed(2).padStart(8)} ms per token, ${((n * 1000) / Math.max(ms, 1e-6)).toFixed(2).padStart(8)} tokens per second` : "-"})`;
  const decode = Math.max(s.completionTokens - 1, 0);
  return [`[onnx: ${s.promptTokens} prompt tokens, ${s.imageTiles} tiles, ${s.completionTokens} new tokens]`,
    line("prompt eval", s.promptTokens, s.timeToFirstTokenMs, "tokens"), line("eval", decode, s.totalMs - s.timeToFirstTokenMs, "runs  "),
    `${"total time".padStart(12)} = ${s.totalMs.toFixed(2).padStart(10)} ms / ${String(s.promptTokens + s.completionTokens).padStart(5)} tokens`].join("\n");
}

function number(value: string | undefined, name: string, integer = false): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isFinite(n) || (integer && !Number.isInteger(n))) throw new ConfigError(`${name} must be a${integer ? "n integer" : " number"}, got ${value}`);
  return n;
}

async function run(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      prompt: { type: "string" }, image: { type: "string", multiple: true, default: [] }, system: { type: "string" },
      "max-new-tokens": { type: "string" }, temperature: { type: "string" }, "top-k": { type: "string" }, "top-p": { type: "string" },
      "repetition-penalty": { type: "string" }, seed: { type: "string" }, stop: { type: "string", multiple: true, default: [] },
      providers: { type: "string", default: "cpu" }, threads: { type: "string" }, stream: { type: "boolean" },
      "no-stream": { type: "boolean" }, stats: { type: "boolean" }, "no-stats": { type: "boolean" },
      json: { type: "boolean", default: false }, "ignore-eos": { type: "boolean", default: false }, "no-verify": { type: "boolean", default: false }, debug: { type: "boolean", default: false },
    },
  });
  const [bundlePath, positionalPrompt, ...extra] = positionals;
  if (!bundlePath) throw new ConfigError("run needs a BUNDLE", { hint: USAGE.split("\n")[0]! });
  if (extra.length) throw new ConfigError(`unexpected argument ${extra[0]}`, { hint: "quote the prompt: it is one argument" });
  const prompt = promptOf(positionalPrompt, values.prompt);
  const stream = values["no-stream"] ? false : (values.stream ?? Boolean(process.stdout.isTTY));
  const stats = values["no-stats"] ? false : (values.stats ?? Boolean(process.stderr.isTTY));
  const maxNew = number(values["max-new-tokens"], "--max-new-tokens", true);
  if (maxNew !== undefined && maxNew < 1) throw new ConfigError(`--max-new-tokens must be at least 1, got ${maxNew}`);
  const given = {
    temperature: number(values.temperature, "--temperature"), topK: number(values["top-k"], "--top-k", true),
    topP: number(values["top-p"], "--top-p"), repetitionPenalty: number(values["repetition-penalty"], "--repetition-penalty"),
  };
  const images: RgbImage[] = [];
  for (const file of values.image as string[]) images.push(await loadImage(file));
  const pipe = await loadPipeline(bundlePath, {
    executionProviders: values.providers!.split(",").map((p) => p.trim()).filter(Boolean),
    threads: number(values.threads, "--threads", true) ?? 0, verify: !values["no-verify"],
  });
  const defaults = samplingDefaults(pipe.manifest.raw, given.temperature);
  const sampling = {
    ...(maxNew !== undefined ? { maxNewTokens: maxNew } : {}),
    temperature: given.temperature ?? defaults.temperature, topK: given.topK ?? defaults.topK,
    topP: given.topP ?? defaults.topP, repetitionPenalty: given.repetitionPenalty ?? defaults.repetitionPenalty,
    stop: values.stop as string[], ...(values.seed !== undefined ? { seed: number(values.seed, "--seed", true)! } : {}),
  };
  if (sampling.temperature < 0 || !(sampling.topP > 0 && sampling.topP <= 1) || sampling.topK < 0 || sampling.repetitionPenalty <= 0) {
    throw new ConfigError("sampling settings out of range", { hint: "temperature >= 0, 0 < top-p <= 1, top-k >= 0, repetition-penalty > 0" });
  }
  if (values["ignore-eos"]) pipe.eosTokenIds = [];
  const messages: Message<RgbImage>[] = values.system ? [{ role: "system", content: [{ type: "text", text: values.system }] }] : [];
  messages.push({ role: "user", content: [...images.map((image) => ({ type: "image" as const, image })), { type: "text", text: prompt }] });
  const request = { messages, sampling };
  const promptIds = pipe.prepare(request).inputIds;
  const ids: number[] = [];
  let text = "";
  for await (const chunk of pipe.stream(request)) {
    ids.push(chunk.tokenId);
    text += chunk.text;
    if (stream && !values.json && chunk.text) process.stdout.write(chunk.text);
  }
  if (values.json) process.stdout.write(JSON.stringify({ prompt_ids: promptIds, generated_ids: ids, text, stats: pipe.lastStats }) + "\n");
  else process.stdout.write(stream ? "\n" : text.trim() + "\n");
  if (stats) process.stderr.write(timings(pipe.lastStats) + "\n");
  await pipe.backend.release();
  return 0;
}

export async function main(argv = process.argv.slice(2)): Promise<number> {
  const [command, ...rest] = argv;
  const debug = rest.includes("--debug");
  if (command !== "run") {
    process.stderr.write(`${USAGE}\n`);
    return 2;
  }
  try {
    return await run(rest);
  } catch (err) {
    if (debug) throw err;
    if (err instanceof SmolEdgeError) {
      process.stderr.write(`smoledge-js run: error: ${err.message}\n`);
      return err.exitCode;
    }
    if (err instanceof TypeError && (err as NodeJS.ErrnoException).code?.startsWith("ERR_PARSE_ARGS")) {
      process.stderr.write(`smoledge-js run: error: ${err.message}\n${USAGE}\n`);
      return 2;
    }
    throw err;
  }
}

main().then((code) => { process.exitCode = code; });
