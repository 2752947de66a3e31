/**
 * The Node platform adapter: bundles from the file system (manifest validated, every file's size and sha256
 * verified), sessions from onnxruntime-node, images decoded from files or buffers.
 */

import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { open, readFile, stat } from "node:fs/promises";
import path from "node:path";

import { Tokenizer } from "@huggingface/tokenizers";
import type * as OrtNode from "onnxruntime-node";

import { OnnxBackend, sessionOptions, type OnnxOptions } from "./backend.js";
import { BackendUnavailableError, BundleError, ImageError, ImageTooLargeError } from "./errors.js";
import { MAX_IMAGE_BYTES, decodeImage } from "./image/decode.js";
import type { RgbImage } from "./image/types.js";
import { parseManifest, type Manifest } from "./manifest.js";
import { Pipeline } from "./pipeline.js";

export interface NodeBundle {
  readonly path: string;
  readonly manifest: Manifest;
  /** The absolute path of a file the manifest lists (never anything outside the bundle). */
  file(relative: string): string;
}

function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash("sha256");
    createReadStream(file).on("data", (chunk) => hash.update(chunk)).on("error", reject).on("end", () => resolve(hash.digest("hex")));
  });
}

function bundleAt(where: string, manifest: Manifest): NodeBundle {
  const root = path.resolve(where);
  return {
    path: where,
    manifest,
    file(relative: string): string {
      if (!(relative in manifest.files)) throw new BundleError(`bundle ${where} lists no file '${relative}'`, { hint: "re-export the bundle" });
      const resolved = path.resolve(root, relative);
      if (!resolved.startsWith(root + path.sep)) {
        throw new BundleError(`bundle ${where} points outside itself ('${relative}')`, { hint: "the manifest was tampered with; re-export the bundle" });
      }
      return resolved;
    },
  };
}

/** Check every listed file: present, the right size and the right sha256. Throws on the first problem. */
export async function verifyBundle(bundle: NodeBundle): Promise<string[]> {
  const checked: string[] = [];
  for (const [rel, meta] of Object.entries(bundle.manifest.files)) {
    const file = bundle.file(rel);
    const info = await stat(file).catch(() => undefined);
    if (!info?.isFile()) throw new BundleError(`bundle ${bundle.path} is missing ${rel}`, { hint: "re-export the bundle" });
    if (info.size !== meta.size) {
      throw new BundleError(`${rel} in bundle ${bundle.path} is ${info.size} bytes, the manifest says ${meta.size} (truncated or replaced)`,
        { hint: "re-export or re-copy the bundle" });
    }
    if ((await sha256File(file)) !== meta.sha256) {
      throw new BundleError(`${rel} in bundle ${bundle.path} does not match its sha256 (tampered or corrupt)`, { hint: "re-export or re-copy the bundle" });
    }
    checked.push(rel);
  }
  return checked;
}

/** Open a bundle folder: read and validate its manifest and (by default) verify its files. */
export async function openBundle(where: string, options: { verify?: boolean } = {}): Promise<NodeBundle> {
  where = where.length > 1 ? where.replace(/\/+$/, "") : where;
  const info = await stat(where).catch(() => undefined);
  if (!info) throw new BundleError(`no bundle at ${where}`, { hint: "give the folder written by 'smoledge export'" });
  const manifestPath = path.join(where, "manifest.json");
  if (!(await stat(manifestPath).catch(() => undefined))?.isFile()) {
    throw new BundleError(`${where} is not a smoledge bundle (no manifest.json)`, { hint: "give the folder written by 'smoledge export'" });
  }
  let data: unknown;
  try {
    data = JSON.parse(await readFile(manifestPath, "utf8"));
  } catch (err) {
    throw new BundleError(`the manifest of ${where} is unreadable (${(err as Error).message})`, { hint: "re-export the bundle" });
  }
  const bundle = bundleAt(where, parseManifest(data, where));
  if (options.verify ?? true) await verifyBundle(bundle);
  return bundle;
}

export async function loadTokenizer(bundle: NodeBundle): Promise<Tokenizer> {
  try {
    return new Tokenizer(JSON.parse(await readFile(bundle.file(bundle.manifest.tokenizerFile), "utf8")), {});
  } catch (err) {
    if (err instanceof BundleError) throw err;
    throw new BundleError(`the bundle's tokenizer cannot be read (${(err as Error).message})`, { hint: "re-export the bundle" });
  }
}

export interface NodeLoadOptions extends OnnxOptions {
  readonly verify?: boolean;
  /** An onnxruntime-node module to use instead of the package's own (e.g. an older one). The package's own is
   * imported only when this is absent: two onnxruntime native libraries cannot share one process. */
  readonly ort?: typeof OrtNode;
}

/** `Pipeline.load` for Node: open + verify the bundle, create the three onnxruntime-node sessions. */
export async function loadPipeline(where: string, options: NodeLoadOptions = {}): Promise<Pipeline> {
  const runtime = options.ort ?? (await import("onnxruntime-node"));
  const bundle = await openBundle(where, { verify: options.verify ?? true });
  const providers = options.executionProviders ?? ["cpu"];
  const available = new Set(runtime.listSupportedBackends?.().map((b) => b.name) ?? ["cpu"]);
  const missing = providers.filter((p) => !available.has(p));
  if (missing.length) {
    throw new BackendUnavailableError(`execution provider(s) ${missing.join(", ")} not in this onnxruntime build`,
      { hint: `available here: ${[...available].join(", ")}` });
  }
  const graphs = bundle.manifest.onnx();
  const opts = sessionOptions({ ...options, executionProviders: providers });
  const backend = await OnnxBackend.create(runtime, graphs, async (graph) => {
    graph.dataFiles.forEach((f) => bundle.file(f)); // listed, inside the bundle
    try {
      return await runtime.InferenceSession.create(bundle.file(graph.file), opts);
    } catch (err) {
      throw new BundleError(`onnxruntime cannot load ${graph.file}: ${String((err as Error).message).split("\n")[0]!.slice(0, 200)}`,
        { hint: "the file is corrupt or from a newer exporter; re-export the bundle" });
    }
  }, bundle.manifest.hiddenSize, options);
  return new Pipeline(bundle.manifest, await loadTokenizer(bundle), backend);
}

/** Read and decode an image file as the Python runtime's `load_image` does (EXIF rotation, then RGB), with
 * its limits and messages (runtime/media.py: at most MAX_IMAGE_BYTES read). */
export async function loadImage(file: string): Promise<RgbImage> {
  let bytes: Buffer;
  try {
    const handle = await open(file, "r");
    try {
      const size = (await handle.stat()).size; // 0 for a device: read up to the cap
      const buffer = Buffer.alloc(Math.min(size || MAX_IMAGE_BYTES + 1, MAX_IMAGE_BYTES + 1));
      let filled = 0;
      for (let n = 1; n > 0 && filled < buffer.length; filled += n) ({ bytesRead: n } = await handle.read(buffer, filled, buffer.length - filled, null));
      bytes = buffer.subarray(0, filled);
    } finally {
      await handle.close();
    }
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new ImageError(`cannot read image file ${file}: not found`, { hint: "check the path" });
    if (code === "EISDIR") throw new ImageError(`image path is a directory, not a file: ${file}`, { hint: "pass a image file" });
    throw new ImageError(`cannot read image file ${file}: ${(err as Error).message}`, { hint: "check the file permissions" });
  }
  if (bytes.length > MAX_IMAGE_BYTES) {
    throw new ImageTooLargeError(`image file ${file} is over the limit of ${MAX_IMAGE_BYTES / 2 ** 20} MiB`, { hint: "pass a smaller image" });
  }
  return decodeImage(new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength), file);
}

export { decodeImage };
