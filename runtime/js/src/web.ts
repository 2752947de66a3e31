/**
 * The browser platform adapter: a bundle fetched from a URL (manifest validated; sizes checked against the
 * manifest, sha256 too when `verify` is on: WebCrypto), sessions from onnxruntime-web (WASM by default,
 * WebGPU where the page asks for it), images from encoded bytes (the same pure-JS decoders as Node, so the
 * pixels are the same) or from an `ImageData` (canvas).
 */

import * as ort from "onnxruntime-web/wasm";

import { sessionOptions, type OnnxOptions } from "./backend.js";
import { BundleError } from "./errors.js";
import { toRgb } from "./image/convert.js";
import type { RgbImage } from "./image/types.js";
import { parseManifest, type Manifest } from "./manifest.js";
import { Pipeline } from "./pipeline.js";

export { decodeImage } from "./image/decode.js";

/** Canvas pixels -> RGB (alpha dropped, as the Python runtime's load_image drops it). */
export function fromImageData(image: { width: number; height: number; data: Uint8ClampedArray }): RgbImage {
  return toRgb({ width: image.width, height: image.height, channels: 4, data: image.data });
}

async function fetchBytes(url: string, what: string): Promise<Uint8Array> {
  const res = await fetch(url);
  if (!res.ok) throw new BundleError(`cannot fetch ${what} (${res.status} ${res.statusText})`, { hint: "check the bundle URL" });
  return new Uint8Array(await res.arrayBuffer());
}

async function checkFile(m: Manifest, rel: string, bytes: Uint8Array, where: string, verify: boolean): Promise<void> {
  const meta = m.files[rel];
  if (!meta) throw new BundleError(`bundle ${where} lists no file '${rel}'`, { hint: "re-export the bundle" });
  if (bytes.length !== meta.size) {
    throw new BundleError(`${rel} in bundle ${where} is ${bytes.length} bytes, the manifest says ${meta.size} (truncated or replaced)`,
      { hint: "re-export or re-copy the bundle" });
  }
  if (verify) {
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>));
    const hex = [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
    if (hex !== meta.sha256) {
      throw new BundleError(`${rel} in bundle ${where} does not match its sha256 (tampered or corrupt)`, { hint: "re-export or re-copy the bundle" });
    }
  }
}

export interface WebLoadOptions extends OnnxOptions {
  /** Hash every file with WebCrypto (sizes are always checked). Default true. */
  readonly verify?: boolean;
  /** Called with each file as it arrives, for a progress display. */
  readonly onFile?: (file: string) => void;
}

/** Load the bundle at `baseUrl` (a folder URL ending in '/') into a pipeline running on onnxruntime-web. */
export async function loadPipelineFromUrl(baseUrl: string, options: WebLoadOptions = {}): Promise<Pipeline> {
  const verify = options.verify ?? true;
  const base = baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`;
  const get = async (rel: string): Promise<Uint8Array> => {
    const bytes = await fetchBytes(new URL(rel, new URL(base, globalThis.location?.href)).href, rel);
    await checkFile(manifest, rel, bytes, baseUrl, verify);
    options.onFile?.(rel);
    return bytes;
  };
  let data: unknown;
  try {
    data = JSON.parse(new TextDecoder().decode(await fetchBytes(new URL("manifest.json", new URL(base, globalThis.location?.href)).href, "manifest.json")));
  } catch (err) {
    if (err instanceof BundleError) throw err;
    throw new BundleError(`the manifest of ${baseUrl} is unreadable (${(err as Error).message})`, { hint: "re-export the bundle" });
  }
  const manifest = parseManifest(data, baseUrl);
  const tokenizerJson = JSON.parse(new TextDecoder().decode(await get(manifest.tokenizerFile))) as object;
  const opts = sessionOptions({ executionProviders: ["wasm"], ...options });
  return Pipeline.create(manifest, tokenizerJson, ort, async (graph) => {
    const model = await get(graph.file);
    const externalData = await Promise.all(graph.dataFiles.map(async (rel) => ({ path: rel.split("/").pop()!, data: await get(rel) })));
    return ort.InferenceSession.create(model, { ...opts, externalData });
  }, { bindOutputs: false, ...options });
}

export { ort };
