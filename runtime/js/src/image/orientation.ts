/**
 * EXIF orientation, as `PIL.ImageOps.exif_transpose` applies it: read tag 0x0112 from a JPEG's APP1
 * "Exif" segment or a PNG's eXIf chunk, then flip / rotate the pixels (orientations 2-8).
 */

import type { RgbImage } from "./types.js";

/** The EXIF orientation (1-8) of encoded JPEG / PNG bytes; 1 when there is none or it cannot be read. */
export function exifOrientation(bytes: Uint8Array): number {
  const tiff = bytes[0] === 0xff && bytes[1] === 0xd8 ? jpegExif(bytes) : pngExif(bytes);
  if (!tiff) return 1;
  try {
    return tiffOrientation(tiff);
  } catch {
    return 1;
  }
}

function jpegExif(b: Uint8Array): Uint8Array | undefined {
  let i = 2;
  while (i + 4 <= b.length && b[i] === 0xff) {
    const marker = b[i + 1]!;
    if (marker === 0xda || marker === 0xd9) return undefined; // start of scan / end: no more metadata
    const len = (b[i + 2]! << 8) | b[i + 3]!;
    const body = b.subarray(i + 4, i + 2 + len);
    if (marker === 0xe1 && body.length > 6 && String.fromCharCode(...body.subarray(0, 6)) === "Exif\0\0") {
      return body.subarray(6);
    }
    i += 2 + len;
  }
  return undefined;
}

function pngExif(b: Uint8Array): Uint8Array | undefined {
  const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
  let i = 8;
  while (i + 8 <= b.length) {
    const len = view.getUint32(i);
    const type = String.fromCharCode(...b.subarray(i + 4, i + 8));
    if (type === "eXIf") return b.subarray(i + 8, i + 8 + len);
    if (type === "IDAT" || type === "IEND") return undefined; // Pillow reads eXIf before the image data
    i += 12 + len;
  }
  return undefined;
}

function tiffOrientation(t: Uint8Array): number {
  const view = new DataView(t.buffer, t.byteOffset, t.byteLength);
  const little = t[0] === 0x49 && t[1] === 0x49;
  if (!little && !(t[0] === 0x4d && t[1] === 0x4d)) return 1;
  const ifd = view.getUint32(4, little);
  const count = view.getUint16(ifd, little);
  for (let n = 0; n < count; n++) {
    const entry = ifd + 2 + n * 12;
    if (view.getUint16(entry, little) === 0x0112) {
      const value = view.getUint16(entry + 8, little);
      return value >= 1 && value <= 8 ? value : 1;
    }
  }
  return 1;
}

/** Whether an orientation swaps width and height (5-8). */
export function swapsSides(orientation: number): boolean {
  return orientation >= 5 && orientation <= 8;
}

/** `ImageOps.exif_transpose`: the pixels as they should be seen; orientation 1 returns the image itself. */
export function applyOrientation(image: RgbImage, orientation: number): RgbImage {
  if (orientation < 2 || orientation > 8) return image;
  const { width: w, height: h } = image;
  const swap = swapsSides(orientation);
  const ow = swap ? h : w;
  const oh = swap ? w : h;
  const out = new Uint8Array(ow * oh * 3);
  // (x, y) in the output -> (sx, sy) in the input, per PIL's transpose method
  const source: (x: number, y: number) => [number, number] = {
    2: (x: number, y: number): [number, number] => [w - 1 - x, y], // FLIP_LEFT_RIGHT
    3: (x: number, y: number): [number, number] => [w - 1 - x, h - 1 - y], // ROTATE_180
    4: (x: number, y: number): [number, number] => [x, h - 1 - y], // FLIP_TOP_BOTTOM
    5: (x: number, y: number): [number, number] => [y, x], // TRANSPOSE
    6: (x: number, y: number): [number, number] => [y, h - 1 - x], // ROTATE_270
    7: (x: number, y: number): [number, number] => [w - 1 - y, h - 1 - x], // TRANSVERSE
    8: (x: number, y: number): [number, number] => [w - 1 - y, x], // ROTATE_90
  }[orientation as 2 | 3 | 4 | 5 | 6 | 7 | 8];
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      const [sx, sy] = source(x, y);
      const s = (sy * w + sx) * 3;
      const o = (y * ow + x) * 3;
      out[o] = image.data[s]!;
      out[o + 1] = image.data[s + 1]!;
      out[o + 2] = image.data[s + 2]!;
    }
  }
  return { width: ow, height: oh, data: out };
}
