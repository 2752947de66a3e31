/** The demo page: pick an image, type a question, watch the answer stream (onnxruntime-web, WASM). */

import { decodeImage, loadPipelineFromUrl, ort } from "../src/web.js";
import type { Pipeline } from "../src/pipeline.js";

const $ = <T extends HTMLElement>(id: string): T => document.getElementById(id) as T;
const status = (text: string): void => { $("status").textContent = text; };

const params = new URLSearchParams(location.search);
const bundleUrl = params.get("bundle") ?? "./bundle/";
ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

let pipeline: Promise<Pipeline> | undefined;
let controller: AbortController | undefined;

async function ask(): Promise<void> {
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset["ids"] = "";
  document.body.dataset["state"] = "running";
  try {
    pipeline ??= loadPipelineFromUrl(bundleUrl, { onFile: (f) => status(`loaded ${f}`) });
    const pipe = await pipeline;
    const files = $<HTMLInputElement>("image").files;
    const images = files?.length ? [decodeImage(new Uint8Array(await files[0]!.arrayBuffer()), files[0]!.name)] : [];
    const text = $<HTMLTextAreaElement>("prompt").value;
    const maxNewTokens = Number($<HTMLInputElement>("max-new-tokens").value) || 48;
    controller = new AbortController();
    status("thinking…");
    const content = [...images.map((image) => ({ type: "image" as const, image })), { type: "text" as const, text }];
    for await (const chunk of pipe.stream({ messages: [{ role: "user", content }], sampling: { maxNewTokens } }, { signal: controller.signal })) {
      answer.textContent += chunk.text;
      answer.dataset["ids"] += `${answer.dataset["ids"] ? "," : ""}${chunk.tokenId}`;
    }
    const s = pipe.lastStats;
    const rate = (s.completionTokens - 1) / Math.max((s.totalMs - s.timeToFirstTokenMs) / 1000, 1e-9);
    status(`done: ${s.promptTokens} prompt tokens, ${s.imageTiles} tiles, ${s.completionTokens} new tokens, ${rate.toFixed(1)} tok/s`);
    document.body.dataset["state"] = "done";
  } catch (err) {
    status(`error: ${(err as Error).message}`);
    document.body.dataset["state"] = "error";
  }
}

$("ask").addEventListener("click", () => { void ask(); });
$("stop").addEventListener("click", () => controller?.abort());
status(`bundle: ${bundleUrl}`);
document.body.dataset["state"] = "ready";
