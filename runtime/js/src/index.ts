/** smoledge's runtime in TypeScript: the platform-free core. Node: `smoledge-runtime/node`; browsers: `web.ts`. */
export * from "./errors.js";
export { parseManifest, SCHEMA_VERSION, type Manifest, type ImageConfig, type Tokens, type OnnxGraphs, type GraphSpec } from "./manifest.js";
export { preprocess, tileGrid, tilesInGrid, resizedSize, encoderSize, imageTiles, type ProcessedImages, type Grid } from "./preprocess.js";
export { resize } from "./image/resample.js";
export { toRgb } from "./image/convert.js";
export { decodeImage } from "./image/decode.js";
export { applyOrientation, exifOrientation } from "./image/orientation.js";
export type { RgbImage, Pixels } from "./image/types.js";
export { buildPrompt, renderChat, expandImageTokens, imagePromptString, userMessage, type Message, type Part } from "./prompt.js";
export { Sampler, generateStep, streamGenerate, generateText, type SamplingConfig, type StreamChunk } from "./generate.js";
export { OnnxBackend, sessionOptions, type OnnxOptions, type OrtModule, type SessionFactory } from "./backend.js";
export { Pipeline, type ChatRequest, type Prepared, type GenerationStats } from "./pipeline.js";
