/**
 * Every read of a bundle's manifest.json goes through this module: it checks the schema version (newer is
 * refused with the Python runtime's message), validates the whole manifest against the JSON Schema shipped in
 * `schema/manifest.schema.json` (ajv), and gives the rest of the package a typed view of the parts it uses.
 * When the manifest's schema changes, this file and the schema file are what change.
 *
 * Schema 2: `schema/manifest.schema.json` is a copy of the Python runtime's `runtime/manifest.schema.json`
 * (tests/test_js_runtime.py keeps them equal). Nothing outside this module reads the manifest's JSON.
 */

import Ajv2020 from "ajv/dist/2020.js";

import { BundleError } from "./errors.js";
import schema from "../schema/manifest.schema.json" with { type: "json" };

export const SCHEMA_VERSION = 3;

export interface ImageConfig {
  readonly tile_size: number;
  readonly longest_edge: number;
  readonly image_seq_len: number;
  readonly do_resize: boolean;
  readonly do_image_splitting: boolean;
  readonly resample: number;
  readonly do_rescale: boolean;
  readonly rescale_factor: number;
  readonly do_normalize: boolean;
  readonly image_mean: readonly number[];
  readonly image_std: readonly number[];
  readonly do_convert_rgb: boolean;
}

export interface Tokens {
  readonly image: string;
  readonly fake_image: string;
  readonly global_image: string;
  readonly image_token_id: number;
  readonly bos_token?: string | null;
  readonly eos_token?: string | null;
}

/** One ONNX graph: its file, sidecar data files, symbolic I/O shapes and their dtypes where recorded. */
export interface GraphSpec {
  readonly file: string;
  readonly dataFiles: readonly string[];
  readonly inputs: Readonly<Record<string, readonly (number | string)[]>>;
  readonly outputs: Readonly<Record<string, readonly (number | string)[]>>;
  /** I/O name -> numpy dtype name ("float16", "float32", "int64"); null or absent = not recorded. */
  readonly dtypes: Readonly<Record<string, string | null>>;
}

/** The ONNX artifact by role; the manifest's graph keys are only known here. */
export interface OnnxGraphs {
  readonly visionEncoder: GraphSpec;
  readonly embedTokens: GraphSpec;
  readonly decoder: GraphSpec;
}

export interface Manifest {
  readonly raw: Readonly<Record<string, unknown>>;
  readonly modelId: string;
  readonly contextLength: number;
  /** The text model's hidden size (the width of every embedding row). */
  readonly hiddenSize: number;
  readonly image: ImageConfig;
  readonly tokens: Tokens;
  readonly chatTemplate: string;
  readonly maxNewTokens: number;
  readonly eosTokenIds: readonly number[];
  readonly tokenizerFile: string;
  readonly files: Readonly<Record<string, { readonly sha256: string; readonly size: number }>>;
  readonly formats: readonly string[];
  /** The ONNX graphs, or a BundleError naming the formats the bundle has. */
  onnx(): OnnxGraphs;
  /** Oldest onnxruntime the ONNX graphs run on ("1.20"), when the exporter recorded it. */
  readonly onnxruntimeMin: string | undefined;
}

const ajv = new Ajv2020.default({ allErrors: true, strict: false });
const validate = ajv.compile(schema);

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** Check and wrap a parsed manifest.json; `where` is the bundle's path or URL, as in the Python messages. */
export function parseManifest(data: unknown, where: string): Manifest {
  if (typeof data !== "object" || data === null || Array.isArray(data)) {
    throw new BundleError(`the manifest of ${where} is not a JSON object`, { hint: "re-export the bundle" });
  }
  const m = data as Json;
  const version = m["schema_version"];
  if (!Number.isInteger(version)) {
    throw new BundleError(`the manifest of ${where} has no schema_version`, { hint: "re-export the bundle" });
  }
  if (version > SCHEMA_VERSION) {
    throw new BundleError(`bundle ${where} uses manifest schema ${version}, newer than this smoledge reads (${SCHEMA_VERSION})`,
      { hint: "upgrade smoledge: git pull in its clone, then pip install -e ." });
  }
  if (version < SCHEMA_VERSION) {
    throw new BundleError(`bundle ${where} uses manifest schema ${version}, older than this smoledge reads (${SCHEMA_VERSION})`,
      { hint: `re-export it with this smoledge version (schema ${SCHEMA_VERSION})` });
  }
  if (!validate(m)) {
    const problems = (validate.errors ?? []).map((e) => `${e.instancePath || "/"} ${e.message ?? "is invalid"}`);
    throw new BundleError(`the manifest of ${where} does not match schema ${SCHEMA_VERSION}: ${problems.join("; ")}`,
      { hint: "re-export the bundle" });
  }
  return wrap(m, where);
}

type Tensors = Record<string, { shape: (number | string)[]; dtype: string | null }>;
const shapes = (t: Tensors): Record<string, (number | string)[]> => Object.fromEntries(Object.entries(t).map(([k, v]) => [k, v.shape]));
const dtypes = (t: Tensors): Record<string, string | null> => Object.fromEntries(Object.entries(t).map(([k, v]) => [k, v.dtype]));

function graph(g: Json): GraphSpec {
  const files: string[] = g["files"];
  return { file: g["file"], dataFiles: files.filter((f) => f !== g["file"]), inputs: shapes(g["inputs"]), outputs: shapes(g["outputs"]),
    dtypes: { ...dtypes(g["inputs"]), ...dtypes(g["outputs"]) } };
}

function wrap(m: Json, where: string): Manifest {
  const formats = Object.keys(m["artifacts"]).sort();
  const onnx = m["artifacts"]["onnx"] as Json | undefined;
  return {
    raw: m,
    modelId: m["source"]["model_id"],
    contextLength: m["context_length"],
    hiddenSize: m["model"]["text"]["hidden_size"],
    image: m["image"],
    tokens: m["tokens"],
    chatTemplate: m["chat_template"],
    maxNewTokens: m["generation"]["max_new_tokens"],
    eosTokenIds: m["generation"]["eos_token_ids"],
    tokenizerFile: m["tokenizer"]["file"],
    files: m["files"],
    formats,
    onnxruntimeMin: onnx?.["runtime"]?.["onnxruntime_min"],
    onnx(): OnnxGraphs {
      if (!onnx) {
        throw new BundleError(`bundle ${where} has no onnx artifacts (it has: ${formats.join(", ")})`,
          { hint: `export them with: smoledge export MODEL --format onnx --out ${where}` });
      }
      const g = onnx["graphs"];
      return { visionEncoder: graph(g["vision_encoder"]), embedTokens: graph(g["embed_tokens"]), decoder: graph(g["decoder"]) };
    },
  };
}
