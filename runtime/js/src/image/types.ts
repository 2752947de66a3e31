/** An 8-bit RGB image, rows top to bottom, 3 bytes per pixel (what the preprocessing works on). */
export interface RgbImage {
  readonly width: number;
  readonly height: number;
  readonly data: Uint8Array;
}

/** Raw pixels as a platform hands them over: 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA) channels. */
export interface Pixels {
  readonly width: number;
  readonly height: number;
  readonly channels: 1 | 2 | 3 | 4;
  readonly data: Uint8Array | Uint8ClampedArray;
}
