#!/usr/bin/env node
/**
 * `smoledge-js run BUNDLE [--image IMG]... --prompt TEXT [--max-new-tokens N] [--json] [--stream]`, mirroring
 * `smoledge run`: the same bundle, the same greedy answer. `--json` prints the prompt ids, generated ids and
 * text. Errors: one line `smoledge-js run: error: MESSAGE (HINT)` and the Python tree's exit code (2);
 * `--debug` shows the stack.
 */

import { parseArgs } from "node:util";

import { ConfigError, SmolEdgeError } from "./errors.js";
import { loadImage, loadPipeline } from "./node.js";
import type { Message } from "./prompt.js";
import type { RgbImage } from "./image/types.js";

const USAGE = `usage: smoledge-js run BUNDLE --prompt TEXT [--image IMG]... [--system TEXT] [--max-new-tokens N]
                   [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S] [--stop STR]...
                   [--providers cpu,...] [--threads N] [--stream] [--json] [--ignore-eos] [--no-verify] [--debug]`;

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
      providers: { type: "string", default: "cpu" }, threads: { type: "string" }, stream: { type: "boolean", default: false },
      json: { type: "boolean", default: false }, "ignore-eos": { type: "boolean", default: false }, "no-verify": { type: "boolean", default: false }, debug: { type: "boolean", default: false },
    },
  });
  const [bundlePath] = positionals;
  if (!bundlePath || values.prompt === undefined) throw new ConfigError("run needs a BUNDLE and --prompt", { hint: USAGE.split("\n")[0]! });
  const maxNew = number(values["max-new-tokens"], "--max-new-tokens", true);
  if (maxNew !== undefined && maxNew < 1) throw new ConfigError(`--max-new-tokens must be at least 1, got ${maxNew}`);
  const sampling = {
    ...(maxNew !== undefined ? { maxNewTokens: maxNew } : {}),
    temperature: number(values.temperature, "--temperature") ?? 0, topK: number(values["top-k"], "--top-k", true) ?? 0,
    topP: number(values["top-p"], "--top-p") ?? 1, repetitionPenalty: number(values["repetition-penalty"], "--repetition-penalty") ?? 1,
    stop: values.stop as string[], ...(values.seed !== undefined ? { seed: number(values.seed, "--seed", true)! } : {}),
  };
  if (sampling.temperature < 0 || !(sampling.topP > 0 && sampling.topP <= 1) || sampling.topK < 0 || sampling.repetitionPenalty <= 0) {
    throw new ConfigError("sampling settings out of range", { hint: "temperature >= 0, 0 < top-p <= 1, top-k >= 0, repetition-penalty > 0" });
  }
  const images: RgbImage[] = [];
  for (const file of values.image as string[]) images.push(await loadImage(file));
  const pipe = await loadPipeline(bundlePath, {
    executionProviders: values.providers!.split(",").map((p) => p.trim()).filter(Boolean),
    threads: number(values.threads, "--threads", true) ?? 0, verify: !values["no-verify"],
  });
  if (values["ignore-eos"]) pipe.eosTokenIds = [];
  const messages: Message<RgbImage>[] = values.system ? [{ role: "system", content: [{ type: "text", text: values.system }] }] : [];
  messages.push({ role: "user", content: [...images.map((image) => ({ type: "image" as const, image })), { type: "text", text: values.prompt }] });
  const request = { messages, sampling };
  const promptIds = pipe.prepare(request).inputIds;
  const ids: number[] = [];
  let text = "";
  for await (const chunk of pipe.stream(request)) {
    ids.push(chunk.tokenId);
    text += chunk.text;
    if (values.stream && !values.json && chunk.text) process.stdout.write(chunk.text);
  }
  if (values.json) process.stdout.write(JSON.stringify({ prompt_ids: promptIds, generated_ids: ids, text, stats: pipe.lastStats }) + "\n");
  else process.stdout.write(values.stream ? "\n" : text.trim() + "\n");
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
