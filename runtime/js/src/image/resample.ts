/**
 * Pillow's resampling (`src/libImaging/Resample.c`), reproduced in integer arithmetic so that a resize gives
 * the same uint8 pixels as `Image.resize(size, LANCZOS)` in the Python runtime.
 *
 * As Pillow does it: coefficients are computed in float64 per output pixel (support scaled by the
 * downscale factor, normalised to sum 1), turned into fixed point with 22 fractional bits, and the image is
 * resampled in two separable passes, with a rounding offset and a clamp to 0..255 after each pass. A pass
 * whose size does not change is skipped. The order is Pillow 13's: vertical first when the height shrinks by
 * more than twice as many pixels as the width (`in_h - out_h > 2 * (in_w - out_w)`, Pillow PR 9549), else
 * horizontal first (only over the rows the vertical pass will read). The order changes the uint8 result.
 */

import type { RgbImage } from "./types.js";

const PRECISION_BITS = 32 - 8 - 2;

type Filter = { readonly support: number; readonly fn: (x: number) => number };

function sinc(x: number): number {
  if (x === 0.0) return 1.0;
  const px = x * Math.PI;
  return Math.sin(px) / px;
}

/** Pillow's filter numbers (`Image.Resampling`); NEAREST (0) is not a convolution and is not offered. */
export const FILTERS: ReadonlyMap<number, Filter> = new Map<number, Filter>([
  [1, { support: 3.0, fn: (x) => (x >= -3.0 && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0) }], // LANCZOS
  [2, { support: 1.0, fn: (x) => Math.max(0, 1.0 - Math.abs(x)) }], // BILINEAR
  [3, { support: 2.0, fn: bicubic }], // BICUBIC
  [4, { support: 0.5, fn: (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0) }], // BOX
]);

function bicubic(x: number): number {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

type Coefficients = { ksize: number; bounds: Int32Array; kk: Int32Array };

/** `precompute_coeffs` + `normalize_coeffs_8bpc` for resampling `inSize` samples to `outSize`. */
function coefficients(inSize: number, outSize: number, filter: Filter): Coefficients {
  const scale = inSize / outSize; // Pillow: (double)(in1 - in0) / outSize with box = (0, inSize)
  const filterscale = Math.max(scale, 1.0);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const weights = new Float64Array(ksize);
  const invFilterscale = 1.0 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      const w = filter.fn((x + xmin - center + 0.5) * invFilterscale);
      weights[x] = w;
      ww += w;
    }
    for (let x = 0; x < ksize; x++) {
      let k = x < xmax ? weights[x]! : 0;
      if (x < xmax && ww !== 0.0) k /= ww;
      kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * (1 << PRECISION_BITS)) : Math.trunc(0.5 + k * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

function clip8(ss: number): number {
  const v = ss >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

function horizontal(src: RgbImage, outWidth: number, rowFirst: number, rows: number, c: Coefficients): RgbImage {
  const out = new Uint8Array(outWidth * rows * 3);
  const inStride = src.width * 3;
  for (let yy = 0; yy < rows; yy++) {
    const lineIn = (yy + rowFirst) * inStride;
    for (let xx = 0; xx < outWidth; xx++) {
      const xmin = c.bounds[xx * 2]!;
      const xmax = c.bounds[xx * 2 + 1]!;
      const k0 = xx * c.ksize;
      let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
      for (let x = 0; x < xmax; x++) {
        const k = c.kk[k0 + x]!;
        const p = lineIn + (x + xmin) * 3;
        s0 += src.data[p]! * k;
        s1 += src.data[p + 1]! * k;
        s2 += src.data[p + 2]! * k;
      }
      const o = (yy * outWidth + xx) * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return { width: outWidth, height: rows, data: out };
}

function vertical(src: RgbImage, outHeight: number, c: Coefficients, rowShift: number): RgbImage {
  const width = src.width;
  const out = new Uint8Array(width * outHeight * 3);
  const stride = width * 3;
  for (let yy = 0; yy < outHeight; yy++) {
    const ymin = c.bounds[yy * 2]! - rowShift;
    const ymax = c.bounds[yy * 2 + 1]!;
    const k0 = yy * c.ksize;
    for (let i = 0; i < stride; i++) {
      let s = 1 << (PRECISION_BITS - 1);
      for (let y = 0; y < ymax; y++) s += src.data[(y + ymin) * stride + i]! * c.kk[k0 + y]!;
      out[yy * stride + i] = clip8(s);
    }
  }
  return { width, height: outHeight, data: out };
}

/** `image.resize((width, height), resample=filter)` on an RGB image, bit-identical to Pillow's. */
export function resize(image: RgbImage, width: number, height: number, filterId = 1): RgbImage {
  const filter = FILTERS.get(filterId);
  if (!filter) throw new RangeError(`unsupported resampling filter ${filterId}`);
  if (width === image.width && height === image.height) {
    return { width, height, data: image.data.slice() };
  }
  const vert = coefficients(image.height, height, filter);
  if (height < image.height && image.height - height > 2 * (image.width - width)) {
    const tall = vertical(image, height, vert, 0);
    return width === image.width ? tall : horizontal(tall, width, 0, height, coefficients(image.width, width, filter));
  }
  const first = vert.bounds[0]!;
  const last = vert.bounds[height * 2 - 2]! + vert.bounds[height * 2 - 1]!;
  let current = image;
  let shift = 0;
  if (width !== image.width) {
    current = horizontal(image, width, first, last - first, coefficients(image.width, width, filter));
    shift = first;
  }
  if (height !== image.height) current = vertical(current, height, vert, shift);
  return current;
}
