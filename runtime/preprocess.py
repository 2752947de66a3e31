"""SmolVLM / Idefics3 image preprocessing in numpy + Pillow, identical to transformers'.

The reference is transformers' PIL image processor (``Idefics3ImageProcessorPil``; SmolVLM's is generated
from the same code).  One image goes through::

    convert to RGB (transparency composited onto white)
    -> resize so the longest edge is ``longest_edge`` (LANCZOS, the short edge rounded up to even)
    -> split on: resize up to multiples of ``tile_size``, cut ``rows x cols`` tiles, add a global
       image squashed to ``tile_size x tile_size``;   split off: squash to ``tile_size x tile_size``
    -> rescale (x / 255) and normalize ((x - 0.5) / 0.5), as float32, channels first.

Every resize goes through Pillow on uint8 pixels, as transformers does, so the result is bit-identical.
:func:`tile_grid` gives the same ``(rows, cols)`` from the size alone, without touching pixels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smoledge.errors import ConfigError, ImageError
from smoledge.runtime.media import DEFAULT_LIMITS, DecodedImage, MediaLimits, decode_error, decode_image, open_image

ImageSource = str | Path | bytes | Image.Image

MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on the resized image's longest edge
LANCZOS = int(Image.Resampling.LANCZOS)  # == 1, transformers' PILImageResampling.LANCZOS
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Everything the image preprocessing needs; goes into the bundle manifest's "image" section.

    ``tile_size`` is HF's ``max_image_size["longest_edge"]`` (the vision encoder's input side),
    ``longest_edge`` is HF's ``size["longest_edge"]``, ``image_seq_len`` the ``<image>`` tokens per tile.
    ``do_pad`` is recorded as HF has it; tiles are always padded to one size here (for SmolVLM every tile
    is ``tile_size`` square, so padding never happens and the attention mask is all True).
    """

    tile_size: int
    longest_edge: int
    image_seq_len: int
    do_resize: bool = True
    do_image_splitting: bool = True
    resample: int = LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True
    do_pad: bool = True

    def __post_init__(self) -> None:
        for name in ("tile_size", "longest_edge", "image_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"image config: {name} must be a positive integer, got {value!r}",
                                  hint="fix the bundle manifest's image section")
        if int(self.resample) not in {int(r) for r in Image.Resampling}:
            raise ConfigError(f"image config: unknown resample filter {self.resample!r}",
                              hint="use a PIL filter number, e.g. 1 for LANCZOS")
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or (name == "image_std" and 0.0 in value):
                raise ConfigError(f"image config: {name} must be 3 numbers (std non-zero), got {value!r}",
                                  hint="fix the bundle manifest's image section")
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessorConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"image config: unknown keys {unknown}",
                              hint="the bundle may be newer than this runtime; upgrade smoledge")
        try:
            return cls(**dict(d))
        except TypeError as err:
            raise ConfigError(f"image config: {err}", hint="fix the bundle manifest's image section") from err

    @classmethod
    def from_hf_preprocessor_config(cls, d: Mapping[str, Any], image_seq_len: int) -> ImageProcessorConfig:
        """Read a Hugging Face ``preprocessor_config.json`` (Idefics3 / SmolVLM image processor)."""
        size, max_size = d.get("size", {"longest_edge": 4 * 364}), d.get("max_image_size", {"longest_edge": 364})
        for key, value in (("size", size), ("max_image_size", max_size)):
            if not isinstance(value, Mapping) or "longest_edge" not in value:
                raise ConfigError(f"preprocessor_config.json: {key} must have a 'longest_edge', got {value!r}",
                                  hint="only SmolVLM / Idefics3 image processors are supported")
        return cls(
            tile_size=int(max_size["longest_edge"]),
            longest_edge=int(size["longest_edge"]),
            image_seq_len=int(image_seq_len),
            do_resize=bool(d.get("do_resize", True)),
            do_image_splitting=bool(d.get("do_image_splitting", True)),
            resample=int(d.get("resample", LANCZOS)),
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=_three(d.get("image_mean", 0.5)),
            image_std=_three(d.get("image_std", 0.5)),
            do_convert_rgb=bool(d.get("do_convert_rgb", True)),
            do_pad=bool(d.get("do_pad", True)),
        )


def _three(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


@dataclass(frozen=True)
class ProcessedImages:
    """The vision encoder's input for a request: every real tile of every image, in order."""

    pixel_values: np.ndarray  # float32 [n_tiles, 3, H, W]
    pixel_attention_mask: np.ndarray  # bool [n_tiles, H, W]
    grids: tuple[tuple[int, int], ...]  # (rows, cols) per image; (0, 0) = not split

    @property
    def tiles_per_image(self) -> tuple[int, ...]:
        return tuple(tiles_in_grid(r, c) for r, c in self.grids)


# --------------------------------------------------------------------------------------------- loading


def load_image(src: ImageSource, limits: MediaLimits = DEFAULT_LIMITS) -> Image.Image:
    """Open and decode an image like ``transformers.image_utils.load_image``: EXIF rotation, then RGB.

    Note this drops an alpha channel without compositing (``convert("RGB")``), exactly as transformers'
    ``load_image`` does.  Raises :class:`ImageError` for a missing, unreadable, unsupported, truncated or
    oversized image (bytes and pixels capped by ``limits`` before decoding; see :mod:`.media`).
    """
    return decode_image(src, limits)


def peek_image_size(src: ImageSource, limits: MediaLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """``(width, height)`` of the image :func:`preprocess` will see for ``src``, reading only the header.

    A path / bytes is EXIF-rotated by :func:`load_image`, so orientations 5-8 swap the sides; an already
    decoded PIL image is taken as it is (as transformers' processor takes it): its plain size.
    """
    image, _ = open_image(src, limits)
    if isinstance(src, (Image.Image, DecodedImage)):
        return image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        orientation = 1
    w, h = image.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# --------------------------------------------------------------------------------------------- sizes


def resized_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """HF ``get_resize_output_image_size``: longest edge -> ``longest_edge``, short edge rounded up to even."""
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # then scale below MAX_IMAGE_SIZE (HF ``_resize_output_size_scale_below_upper_bound``)
    aspect_ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect_ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect_ratio)
    return max(height, 1), max(width, 1)


def encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """HF ``resize_for_vision_encoder``: both sides up to multiples of ``tile``, keeping the aspect ratio."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


def _split_grid(height: int, width: int, tile: int) -> tuple[int, int]:
    if height > tile or width > tile:
        return (height - tile) // tile + 1, (width - tile) // tile + 1
    return 0, 0


def tile_grid(width: int, height: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """``(rows, cols)`` the preprocessing will produce for an image of this size; ``(0, 0)`` = not split."""
    if width <= 0 or height <= 0:
        raise ImageError(f"image has an empty size {width}x{height}", hint="pass a non-empty image")
    if not cfg.do_image_splitting:
        return 0, 0
    if cfg.do_resize:
        height, width = resized_size(height, width, cfg.longest_edge)
    return _split_grid(*encoder_size(height, width, cfg.tile_size), cfg.tile_size)


def tiles_in_grid(rows: int, cols: int) -> int:
    """Tiles the vision encoder sees for one image: the split tiles plus the global image."""
    return rows * cols + 1 if rows or cols else 1


def count_tiles(width: int, height: int, cfg: ImageProcessorConfig) -> int:
    return tiles_in_grid(*tile_grid(width, height, cfg))


# --------------------------------------------------------------------------------------------- pixels


def to_rgb(image: Image.Image, cfg: ImageProcessorConfig) -> Image.Image:
    """HF ``convert_to_rgb``: anything with alpha (or a transparency key) is composited onto white."""
    if not cfg.do_convert_rgb:
        if image.mode != "RGB":
            raise ImageError(f"image mode {image.mode} needs RGB conversion, which this bundle turns off",
                             hint="convert the image to RGB first")
        return image
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except _DECODE_ERRORS as err:
        raise decode_error("the image", err) from err


def _resize(image: Image.Image, height: int, width: int, cfg: ImageProcessorConfig) -> Image.Image:
    return image.resize((width, height), resample=Image.Resampling(cfg.resample))


def image_tiles(image: Image.Image, cfg: ImageProcessorConfig) -> tuple[list[np.ndarray], tuple[int, int]]:
    """One image -> its uint8 HWC tiles (split tiles row-major, then the global image) and ``(rows, cols)``."""
    image = to_rgb(image, cfg)
    if image.width <= 0 or image.height <= 0:
        raise ImageError(f"image has an empty size {image.width}x{image.height}", hint="pass a non-empty image")
    if cfg.do_resize:
        image = _resize(image, *resized_size(image.height, image.width, cfg.longest_edge), cfg)
    tile = cfg.tile_size
    if not cfg.do_image_splitting:
        return [np.asarray(_resize(image, tile, tile, cfg))], (0, 0)
    image = _resize(image, *encoder_size(image.height, image.width, tile), cfg)
    rows, cols = _split_grid(image.height, image.width, tile)
    if rows == 0 and cols == 0:
        return [np.asarray(image)], (0, 0)
    pixels = np.asarray(image)
    tiles = [pixels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    tiles.append(np.asarray(_resize(image, tile, tile, cfg)))
    return tiles, (rows, cols)


def _normalize(tile: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """uint8 HWC -> float32 CHW with HF's exact arithmetic (rescale in float64, normalize in float32)."""
    x = np.ascontiguousarray(tile.transpose(2, 0, 1))
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32) if cfg.do_rescale else x.astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return x


def preprocess(images: list, cfg: ImageProcessorConfig) -> ProcessedImages:
    """Images (PIL images, paths or bytes) -> the vision encoder's input, matching transformers exactly.

    Paths / bytes / data URLs go through :func:`load_image` (as transformers loads paths: EXIF rotation, then
    a plain RGB conversion); PIL images are used as given (as ``processor(images=[pil])``: no EXIF rotation,
    transparency composited onto white).

    Tiles are zero-padded to the largest tile in the call (as HF pads a batch); with the SmolVLM
    pipeline every tile is ``tile_size`` square, so the mask is all True.
    """
    if not images:
        raise ImageError("no images to preprocess", hint="pass at least one image")
    per_image = [image_tiles(im if isinstance(im, Image.Image) else load_image(im), cfg) for im in images]
    tiles = [t for image_tiles_of_one, _ in per_image for t in image_tiles_of_one]
    height, width = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    pixel_values = np.zeros((len(tiles), 3, height, width), dtype=np.float32)
    mask = np.zeros((len(tiles), height, width), dtype=bool)
    for i, t in enumerate(tiles):
        pixel_values[i, :, : t.shape[0], : t.shape[1]] = _normalize(t, cfg)
        mask[i, : t.shape[0], : t.shape[1]] = True
    return ProcessedImages(pixel_values, mask, tuple(grid for _, grid in per_image))
