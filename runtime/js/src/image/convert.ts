/**
 * Pixels -> RGB as the Python runtime's `load_image` does it (`image.convert("RGB")` after decoding a file):
 * gray is replicated, an alpha channel is dropped (not composited: transformers' `load_image` drops it too).
 */

import { ImageError } from "../errors.js";
import type { Pixels, RgbImage } from "./types.js";

export function toRgb(pixels: Pixels): RgbImage {
  const { width, height, channels, data } = pixels;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width <= 0 || height <= 0) {
    throw new ImageError(`image has an empty size ${width}x${height}`, { hint: "pass a non-empty image" });
  }
  if (data.length !== width * height * channels) {
    throw new ImageError(`image data holds ${data.length} bytes, not ${width}x${height}x${channels}`,
      { hint: "pass width, height and channels that match the pixel buffer" });
  }
  const out = new Uint8Array(width * height * 3);
  for (let i = 0, o = 0; o < out.length; i += channels, o += 3) {
    if (channels <= 2) {
      out[o] = out[o + 1] = out[o + 2] = data[i]!;
    } else {
      out[o] = data[i]!;
      out[o + 1] = data[i + 1]!;
      out[o + 2] = data[i + 2]!;
    }
  }
  return { width, height, data: out };
}
