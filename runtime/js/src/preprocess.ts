/**
 * SmolVLM / Idefics3 image preprocessing from pixels, the same as the Python runtime's
 * `runtime/preprocess.py` (and so transformers'):
 *
 *     RGB -> resize so the longest edge is `longest_edge` (LANCZOS, short edge rounded up to even)
 *     -> split on: resize up to multiples of `tile_size`, cut rows x cols tiles, add a global image squashed
 *        to tile_size x tile_size;  split off: squash to tile_size x tile_size
 *     -> rescale (x * rescale_factor, in float64 then float32) and normalise ((x - mean) / std, float32), CHW.
 *
 * Every resize is Pillow's arithmetic (`image/resample.ts`), so the tiles are the same bytes as PIL's.
 */

import { ImageError } from "./errors.js";
import { resize } from "./image/resample.js";
import type { RgbImage } from "./image/types.js";
import type { ImageConfig } from "./manifest.js";

export const MAX_IMAGE_SIZE = 4096; // transformers' cap on the resized image's longest edge

export type Grid = readonly [rows: number, cols: number];

export interface ProcessedImages {
  /** float32 [nTiles, 3, height, width] */
  readonly pixelValues: Float32Array;
  /** bool as uint8 [nTiles, height, width] */
  readonly pixelAttentionMask: Uint8Array;
  readonly nTiles: number;
  readonly height: number;
  readonly width: number;
  /** (rows, cols) per image; (0, 0) = not split */
  readonly grids: readonly Grid[];
}

/** HF `get_resize_output_image_size`: longest edge -> `longestEdge`, the short edge rounded up to even. */
export function resizedSize(height: number, width: number, longestEdge: number): [number, number] {
  let aspect = width / height;
  if (width >= height) {
    width = longestEdge;
    height = Math.trunc(width / aspect);
    height += height % 2;
  } else {
    height = longestEdge;
    width = Math.trunc(height * aspect);
    width += width % 2;
  }
  height = Math.max(height, 1);
  width = Math.max(width, 1);
  aspect = width / height;
  if (width >= height && width > MAX_IMAGE_SIZE) {
    width = MAX_IMAGE_SIZE;
    height = Math.trunc(MAX_IMAGE_SIZE / aspect);
  } else if (height > width && height > MAX_IMAGE_SIZE) {
    height = MAX_IMAGE_SIZE;
    width = Math.trunc(MAX_IMAGE_SIZE * aspect);
  }
  return [Math.max(height, 1), Math.max(width, 1)];
}

/** HF `resize_for_vision_encoder`: both sides up to multiples of `tile`, keeping the aspect ratio. */
export function encoderSize(height: number, width: number, tile: number): [number, number] {
  const aspect = width / height;
  if (width >= height) {
    width = Math.ceil(width / tile) * tile;
    height = Math.ceil(Math.trunc(width / aspect) / tile) * tile;
  } else {
    height = Math.ceil(height / tile) * tile;
    width = Math.ceil(Math.trunc(height * aspect) / tile) * tile;
  }
  return [height, width];
}

function splitGrid(height: number, width: number, tile: number): Grid {
  if (height > tile || width > tile) return [Math.floor((height - tile) / tile) + 1, Math.floor((width - tile) / tile) + 1];
  return [0, 0];
}

/** (rows, cols) the preprocessing gives an image of this size, from the size alone. */
export function tileGrid(width: number, height: number, cfg: ImageConfig): Grid {
  if (width <= 0 || height <= 0) {
    throw new ImageError(`image has an empty size ${width}x${height}`, { hint: "pass a non-empty image" });
  }
  if (!cfg.do_image_splitting) return [0, 0];
  if (cfg.do_resize) [height, width] = resizedSize(height, width, cfg.longest_edge);
  const [h, w] = encoderSize(height, width, cfg.tile_size);
  return splitGrid(h, w, cfg.tile_size);
}

/** Tiles the vision encoder sees for one image: the split tiles plus the global image. */
export function tilesInGrid([rows, cols]: Grid): number {
  return rows || cols ? rows * cols + 1 : 1;
}

function crop(image: RgbImage, x0: number, y0: number, size: number): RgbImage {
  const data = new Uint8Array(size * size * 3);
  for (let y = 0; y < size; y++) {
    const from = ((y0 + y) * image.width + x0) * 3;
    data.set(image.data.subarray(from, from + size * 3), y * size * 3);
  }
  return { width: size, height: size, data };
}

/** One RGB image -> its uint8 tiles (split tiles row-major, then the global image) and (rows, cols). */
export function imageTiles(image: RgbImage, cfg: ImageConfig): { tiles: RgbImage[]; grid: Grid } {
  if (image.width <= 0 || image.height <= 0) {
    throw new ImageError(`image has an empty size ${image.width}x${image.height}`, { hint: "pass a non-empty image" });
  }
  const filter = cfg.resample;
  if (cfg.do_resize) {
    const [h, w] = resizedSize(image.height, image.width, cfg.longest_edge);
    image = resize(image, w, h, filter);
  }
  const tile = cfg.tile_size;
  if (!cfg.do_image_splitting) return { tiles: [resize(image, tile, tile, filter)], grid: [0, 0] };
  const [h, w] = encoderSize(image.height, image.width, tile);
  image = resize(image, w, h, filter);
  const grid = splitGrid(image.height, image.width, tile);
  if (grid[0] === 0 && grid[1] === 0) return { tiles: [image], grid };
  const tiles: RgbImage[] = [];
  for (let r = 0; r < grid[0]; r++) for (let c = 0; c < grid[1]; c++) tiles.push(crop(image, c * tile, r * tile, tile));
  tiles.push(resize(image, tile, tile, filter));
  return { tiles, grid };
}

/** uint8 HWC -> float32 CHW at `out`, with HF's arithmetic (rescale in float64 then float32, normalise in float32). */
function normalizeInto(tile: RgbImage, cfg: ImageConfig, out: Float32Array, offset: number, height: number, width: number): void {
  const f = Math.fround;
  const mean = cfg.image_mean.map(f);
  const std = cfg.image_std.map(f);
  for (let c = 0; c < 3; c++) {
    for (let y = 0; y < tile.height; y++) {
      for (let x = 0; x < tile.width; x++) {
        let v = tile.data[(y * tile.width + x) * 3 + c]!;
        v = cfg.do_rescale ? f(v * cfg.rescale_factor) : v;
        if (cfg.do_normalize) v = f(f(v - mean[c]!) / std[c]!);
        out[offset + (c * height + y) * width + x] = v;
      }
    }
  }
}

/** RGB images -> the vision encoder's input; tiles zero-padded to the largest one (always tile_size here). */
export function preprocess(images: readonly RgbImage[], cfg: ImageConfig): ProcessedImages {
  if (images.length === 0) throw new ImageError("no images to preprocess", { hint: "pass at least one image" });
  const perImage = images.map((im) => imageTiles(im, cfg));
  const tiles = perImage.flatMap((p) => p.tiles);
  const height = Math.max(...tiles.map((t) => t.height));
  const width = Math.max(...tiles.map((t) => t.width));
  const pixelValues = new Float32Array(tiles.length * 3 * height * width);
  const pixelAttentionMask = new Uint8Array(tiles.length * height * width);
  tiles.forEach((t, i) => {
    normalizeInto(t, cfg, pixelValues, i * 3 * height * width, height, width);
    for (let y = 0; y < t.height; y++) pixelAttentionMask.fill(1, (i * height + y) * width, (i * height + y) * width + t.width);
  });
  return { pixelValues, pixelAttentionMask, nTiles: tiles.length, height, width, grids: perImage.map((p) => p.grid) };
}
