/** Pixel and prompt parity with the Python runtime on the odd-image set (shared vectors). */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";

import { imageTiles, preprocess, resize, toRgb } from "../src/index.js";
import { loadImage, loadPipeline } from "../src/node.js";
import type { Pipeline } from "../src/pipeline.js";
import type { RgbImage } from "../src/image/types.js";
import { need, readJson, vectorPath, type Bundles } from "./vectors.js";

interface ImageVector {
  file: string; width: number; height: number; decoded: string; tiles_sha256: string[]; grid: [number, number];
  pixels: string; shape: number[]; prompt: string; prompt_ids: number[];
}

const skip = need("images.json", "bundles.json");
const sha = (data: Uint8Array): string => createHash("sha256").update(data).digest("hex");
const isJpeg = (file: string): boolean => file.endsWith(".jpg");
/**
 * JPEG decoders differ (jpeg-js vs PIL's libjpeg-turbo): other IDCT rounding (4:4:4 and gray: at most a few
 * levels) and, for 4:2:0, chroma replicated instead of interpolated (the "fancy upsampling"), which on these
 * noisy synthetic pictures is about 5 levels on average. Decoded JPEG pixels are compared within these bounds;
 * the resize is checked exactly on PIL's decoded pixels below.
 */
const JPEG_MEAN_LEVELS = 6;
const JPEG_MAX_LEVELS = 48;

function pilDecoded(v: ImageVector): RgbImage {
  return { width: v.width, height: v.height, data: new Uint8Array(readFileSync(vectorPath(v.decoded))) };
}

function floats(file: string): Float32Array {
  const b = readFileSync(vectorPath(file));
  return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
}

function meanAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += Math.abs(a[i]! - b[i]!);
  return sum / a.length;
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
  return worst;
}

describe("preprocessing parity with the Python runtime", { skip }, () => {
  const vectors = skip ? [] : readJson<ImageVector[]>("images.json");
  let pipe: Pipeline;
  before(async () => { pipe = await loadPipeline(readJson<Bundles>("bundles.json").tiny_fp32); });
  after(async () => { await pipe?.backend.release(); });

  test("the set has at least ten odd images", () => { assert.ok(vectors.length >= 10, `${vectors.length} images`); });

  for (const v of vectors) {
    test(`${v.file}: decoding gives PIL's pixels${isJpeg(v.file) ? ` (JPEG: mean within ${JPEG_MEAN_LEVELS}, max ${JPEG_MAX_LEVELS} levels)` : " exactly"}`, async () => {
      const mine = await loadImage(vectorPath(v.file));
      assert.deepEqual([mine.width, mine.height], [v.width, v.height]);
      const theirs = pilDecoded(v).data;
      if (isJpeg(v.file)) {
        const [mean, max] = [meanAbsDiff(mine.data, theirs), maxAbsDiff(mine.data, theirs)];
        assert.ok(mean <= JPEG_MEAN_LEVELS && max <= JPEG_MAX_LEVELS, `mean ${mean.toFixed(2)}, max ${max}`);
      }
      else assert.equal(sha(mine.data), sha(theirs));
    });

    test(`${v.file}: tiles are PIL's LANCZOS bytes, pixel_values equal within 1e-6`, () => {
      const cfg = pipe.manifest.image;
      const { tiles, grid } = imageTiles(pilDecoded(v), cfg);
      assert.deepEqual([...grid], v.grid);
      assert.deepEqual(tiles.map((t) => sha(t.data)), v.tiles_sha256);
      const processed = preprocess([pilDecoded(v)], cfg);
      assert.deepEqual([processed.nTiles, 3, processed.height, processed.width], v.shape);
      assert.ok(maxAbsDiff(processed.pixelValues, floats(v.pixels)) <= 1e-6);
    });

    test(`${v.file}: prompt ids equal Python's`, async () => {
      const image = await loadImage(vectorPath(v.file));
      const ids = pipe.prepare({ messages: [{ role: "user", content: [{ type: "image", image }, { type: "text", text: v.prompt }] }] }).inputIds;
      assert.deepEqual(ids, v.prompt_ids);
    });
  }
});

describe("Pillow resampling", () => {
  const skipResize = need("resize.json");
  const cases = skipResize ? [] : readJson<{ input: string; in: [number, number]; out: [number, number]; sha256: string }[]>("resize.json");
  test("random sizes, both pass orders: the same bytes as PIL's LANCZOS", { skip: skipResize }, () => {
    assert.ok(cases.length >= 40);
    for (const c of cases) {
      const image: RgbImage = { width: c.in[0], height: c.in[1], data: new Uint8Array(readFileSync(vectorPath(c.input))) };
      assert.equal(sha(resize(image, c.out[0], c.out[1]).data), c.sha256, `${c.in.join("x")} -> ${c.out.join("x")}`);
    }
  });

  test("identity size copies, one-pixel images stretch to a flat image", () => {
    const px: RgbImage = { width: 1, height: 1, data: new Uint8Array([10, 200, 30]) };
    assert.deepEqual([...resize(px, 1, 1).data], [10, 200, 30]);
    const big = resize(px, 5, 4);
    assert.equal(big.data.length, 60);
    assert.ok(big.data.every((b, i) => b === [10, 200, 30][i % 3]));
  });

  test("gray and RGBA pixels are converted as PIL's convert('RGB') (alpha dropped)", () => {
    const gray = toRgb({ width: 2, height: 1, channels: 2, data: new Uint8Array([7, 0, 9, 255]) });
    assert.deepEqual([...gray.data], [7, 7, 7, 9, 9, 9]);
    const rgba = toRgb({ width: 1, height: 1, channels: 4, data: new Uint8Array([1, 2, 3, 0]) });
    assert.deepEqual([...rgba.data], [1, 2, 3]);
  });
});
