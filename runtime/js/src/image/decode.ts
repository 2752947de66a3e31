/**
 * Encoded PNG / JPEG bytes -> RGB pixels as the Python runtime sees them after `load_image`
 * (`ImageOps.exif_transpose(Image.open(...)).convert("RGB")`), in pure JavaScript (Node and browsers):
 *
 * - PNG (fast-png): 8-bit gray / RGB / palette / alpha as PIL decodes them; 16-bit colour keeps the high byte
 *   (PIL's "RGB;16B" unpacker), 16-bit gray is PIL's "I;16" clipped to 255 on conversion; 1/2/4-bit gray
 *   scaled to 0..255; alpha and tRNS dropped (as `convert("RGB")` drops them).
 * - JPEG (jpeg-js): baseline and progressive, gray or colour. Its IDCT is not libjpeg-turbo's, so decoded
 *   JPEG pixels may differ from PIL's by a few levels (the parity test states the tolerance).
 * - EXIF orientation from a JPEG's APP1 or a PNG's eXIf chunk.
 *
 * Errors are the Python runtime's messages (`ImageError`), with `what` naming the file or "the image data".
 */

import { decode as decodePng } from "fast-png";
import jpeg from "jpeg-js";

import { ImageError, ImageTooLargeError } from "../errors.js";
import { applyOrientation, exifOrientation } from "./orientation.js";
import type { RgbImage } from "./types.js";

/** The Python runtime's `MediaLimits` (runtime/media.py): encoded bytes and width x height of one image. */
export const MAX_IMAGE_BYTES = 64 * 1024 * 1024;
export const MAX_IMAGE_PIXELS = 100_000_000;

const UNSUPPORTED: Record<string, string> = {
  ftypheic: "HEIC", ftypheix: "HEIC", ftypmif1: "HEIF", ftypavif: "AVIF", ftypmsf1: "HEIF",
};

function ascii(bytes: Uint8Array): string {
  return String.fromCharCode(...bytes);
}

function isPng(b: Uint8Array): boolean {
  return b.length >= 8 && b[0] === 0x89 && ascii(b.subarray(1, 4)) === "PNG";
}

function isJpeg(b: Uint8Array): boolean {
  return b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff;
}

function looksLikeText(head: Uint8Array): boolean {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(head);
  } catch {
    return false;
  }
  return [...text].every((ch) => /[\r\n\t\f]/.test(ch) || !/[\p{C}\p{Zl}\p{Zp}]/u.test(ch));
}

/** The error for bytes that are no image this decoder reads (Python's `_unidentified`). */
function unidentified(what: string, data: Uint8Array): ImageError {
  const head = data.subarray(0, 512);
  let fmt = UNSUPPORTED[ascii(head.subarray(4, 12))];
  const start = ascii(head.subarray(0, 16)).trimStart().slice(0, 5).toLowerCase();
  if (!fmt && ["<?xml", "<svg ", "<svg>"].includes(start)) fmt = "SVG";
  if (fmt) return new ImageError(`${what} is a ${fmt} image, which is not supported`, { hint: "convert it to JPEG or PNG" });
  if (looksLikeText(head)) {
    return new ImageError(`${what} is not an image (it looks like a text file)`, { hint: "pass a JPEG, PNG, WebP, BMP or GIF file" });
  }
  return new ImageError(`${what} is not a readable image (unknown format or corrupt data)`,
    { hint: "pass a JPEG, PNG, WebP, BMP or GIF file" });
}

function corrupt(what: string, err: unknown): ImageError {
  const detail = err instanceof Error && err.message ? err.message.split("\n")[0]! : "decode error";
  if (/truncat|end of|unexpected end|out of range|offset/i.test(detail)) {
    return new ImageError(`${what} is truncated (${detail})`, { hint: "the file is incomplete; re-download or re-save it" });
  }
  return new ImageError(`${what} is corrupt and cannot be decoded (${detail})`, { hint: "re-save it as JPEG or PNG" });
}

function tooLarge(what: string, width: number, height: number): ImageTooLargeError {
  const shown = width && height ? `${width}x${height} pixels` : "too many pixels";
  return new ImageTooLargeError(`${what} is ${shown}, over the limit of ${MAX_IMAGE_PIXELS.toLocaleString("en-US")} pixels`,
    { hint: "downscale the image first" });
}

/** Sample `c` of pixel (x, y) from fast-png's data: 1/2/4-bit rows stay packed (MSB first), 8/16-bit are arrays. */
function sampler(png: ReturnType<typeof decodePng>): (x: number, y: number, c: number) => number {
  const { width, depth, channels, data } = png;
  if (depth >= 8) return (x, y, c) => data[(y * width + x) * channels + c]!;
  const stride = Math.ceil((depth * channels * width) / 8);
  const mask = (1 << depth) - 1;
  return (x, y, c) => {
    const bit = (x * channels + c) * depth;
    return (data[y * stride + (bit >> 3)]! >> (8 - depth - (bit & 7))) & mask;
  };
}

function pngToRgb(bytes: Uint8Array, what: string): RgbImage {
  const png = decodePng(bytes);
  const { width, height, depth, channels, palette } = png;
  if (width * height > MAX_IMAGE_PIXELS) throw tooLarge(what, width, height);
  const out = new Uint8Array(width * height * 3);
  const at = sampler(png);
  const high = (v: number): number => (depth === 16 ? v >> 8 : v);
  for (let y = 0, o = 0; y < height; y++) {
    for (let x = 0; x < width; x++, o += 3) {
      if (palette) {
        const color = palette[at(x, y, 0)] ?? [0, 0, 0];
        out[o] = color[0]!;
        out[o + 1] = color[1]!;
        out[o + 2] = color[2]!;
      } else if (channels <= 2) {
        out[o] = out[o + 1] = out[o + 2] = gray(at(x, y, 0), depth);
      } else {
        out[o] = high(at(x, y, 0));
        out[o + 1] = high(at(x, y, 1));
        out[o + 2] = high(at(x, y, 2));
      }
    }
  }
  return { width, height, data: out };
}

/** One gray sample as PIL's RGB conversion gives it: "1" / "L;2" / "L;4" scale up, "I;16" clips at 255. */
function gray(v: number, depth: number): number {
  if (depth === 16) return v > 255 ? 255 : v;
  if (depth < 8) return (v * 255) / ((1 << depth) - 1);
  return v;
}

function jpegToRgb(bytes: Uint8Array, what: string): RgbImage {
  const img = jpeg.decode(bytes, { useTArray: true, formatAsRGBA: true, maxResolutionInMP: MAX_IMAGE_PIXELS / 1e6, tolerantDecoding: false });
  const { width, height } = img;
  const out = new Uint8Array(width * height * 3);
  for (let p = 0, o = 0; o < out.length; p += 4, o += 3) {
    out[o] = img.data[p]!;
    out[o + 1] = img.data[p + 1]!;
    out[o + 2] = img.data[p + 2]!;
  }
  if (width <= 0 || height <= 0) throw new ImageError(`${what} is corrupt and cannot be decoded (no frame)`, { hint: "re-save it as JPEG or PNG" });
  return { width, height, data: out };
}

/** Decode PNG / JPEG bytes to RGB with EXIF orientation applied (`what` names the source in errors). */
export function decodeImage(bytes: Uint8Array, what = "the image data"): RgbImage {
  if (bytes.length > MAX_IMAGE_BYTES) {
    throw new ImageTooLargeError(`${what} is ${(bytes.length / 2 ** 20).toFixed(1)} MiB, over the limit of ${(MAX_IMAGE_BYTES / 2 ** 20).toFixed(1)} MiB`,
      { hint: "pass a smaller image" });
  }
  if (bytes.length === 0) throw new ImageError(`${what} is empty (0 bytes)`, { hint: "pass a complete JPEG, PNG or WebP image" });
  let image: RgbImage;
  try {
    if (isPng(bytes)) image = pngToRgb(bytes, what);
    else if (isJpeg(bytes)) image = jpegToRgb(bytes, what);
    else throw unidentified(what, bytes);
  } catch (err) {
    if (err instanceof ImageError) throw err;
    if (err instanceof Error && /maxResolutionInMP/.test(err.message)) throw tooLarge(what, 0, 0);
    throw corrupt(what, err);
  }
  return applyOrientation(image, exifOrientation(bytes));
}
