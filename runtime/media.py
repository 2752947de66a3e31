"""The one bounded reader for media: image and video files, encoded bytes and ``data:`` URLs.

The CLI, the server and cloud request building all open media here, under one set of limits
(:class:`MediaLimits`) and with one set of one-line errors:

* bytes are capped *before* anything is read whole: a file is read at most ``cap + 1`` bytes (so
  ``--image /dev/zero`` stops at the cap), a data URL's size is known from its length before decoding;
* pixels are capped *before* decoding: Pillow reads the header, the size is checked, and only then
  are pixels decoded (a decompression bomb never allocates its pixels).

:class:`DecodedImage` is encoded bytes that carry their decoded picture, so a server that checked an
image by decoding it does not decode it again to run it (and still sends the original bytes to the cloud).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smoledge.errors import ImageError, ImageTooLargeError, InputError, VideoError

MB = 1024 * 1024
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError)
_UNSUPPORTED_SIGNATURES = {  # formats Pillow cannot read without plugins
    b"ftypheic": "HEIC", b"ftypheix": "HEIC", b"ftypmif1": "HEIF", b"ftypavif": "AVIF", b"ftypmsf1": "HEIF",
}


@dataclass(frozen=True)
class MediaLimits:
    max_image_bytes: int = 64 * MB  # encoded size of one image
    max_image_pixels: int = 100_000_000  # width x height of one image (a 48 Mpx phone photo fits)
    max_video_bytes: int = 2048 * MB  # a video held in memory (bytes or a data URL); files are streamed


DEFAULT_LIMITS = MediaLimits()


class DecodedImage(bytes):
    """Encoded image bytes with their decoded, EXIF-rotated RGB picture attached (``.image``)."""

    image: Any

    def __new__(cls, data: bytes, image: Any) -> DecodedImage:
        obj = super().__new__(cls, data)
        obj.image = image
        return obj


# --------------------------------------------------------------------------------------------- bytes


def read_file(path: str | Path, cap: int, *, what: str, error: type[InputError],
              too_large: type[InputError] | None = None) -> bytes:
    """The bytes of ``path``, never more than ``cap`` read: a longer file (or a device) is an error."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(cap + 1)
    except FileNotFoundError:
        raise error(f"cannot read {what} file {path}: not found", hint="check the path") from None
    except IsADirectoryError:
        raise error(f"{what} path is a directory, not a file: {path}", hint=f"pass a {what} file") from None
    except OSError as err:
        raise error(f"cannot read {what} file {path}: {err.strerror or err}",
                    hint="check the file permissions") from None
    if len(data) > cap:
        raise (too_large or error)(f"{what} file {path} is over the limit of {cap / MB:.0f} MiB",
                                   hint=f"pass a smaller {what}")
    return data


def decode_data_url(url: str, kind: str, cap: int, error: type[InputError],
                    too_large: type[InputError] | None = None) -> bytes:
    """The bytes of a base64 ``data:<kind>/...`` URL; its size is checked before it is decoded."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith(f"data:{kind}/") or ";base64" not in header.lower():
        raise error(f"unsupported data URL: expected data:{kind}/...;base64,...",
                    hint=f"encode the {kind} as a base64 data URL or pass its bytes")
    if len(payload) // 4 * 3 > cap + 2:
        raise (too_large or error)(f"the {kind} data URL holds about {len(payload) // 4 * 3 / MB:.1f} MiB, over "
                                   f"the limit of {cap / MB:.1f} MiB", hint=f"send a smaller {kind}")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise error(f"the {kind} data URL is not valid base64", hint=f"re-encode the {kind}") from None
    if len(data) > cap:
        raise (too_large or error)(f"the {kind} data URL holds {len(data) / MB:.1f} MiB, over the limit of "
                                   f"{cap / MB:.1f} MiB", hint=f"send a smaller {kind}")
    return data


def image_bytes(src: Any, limits: MediaLimits = DEFAULT_LIMITS) -> tuple[bytes, str]:
    """``(encoded bytes, what to call it in errors)`` for a path, bytes or an image data URL."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, what = bytes(src), "the image data"
        if len(data) > limits.max_image_bytes:
            raise ImageTooLargeError(f"the image data is {len(data) / MB:.1f} MiB, over the limit of "
                             f"{limits.max_image_bytes / MB:.1f} MiB", hint="pass a smaller image")
    elif isinstance(src, str) and src[:5].lower() == "data:":
        cap = limits.max_image_bytes
        data, what = decode_data_url(src, "image", cap, ImageError, ImageTooLargeError), "the data URL"
    elif isinstance(src, str) and src.startswith(("http://", "https://")):
        raise ImageError(f"image URLs are not downloaded by the runtime: {src[:80]}",
                         hint="download the image and pass a local path or its bytes")
    elif isinstance(src, (str, Path)):
        data, what = read_file(src, limits.max_image_bytes, what="image", error=ImageError,
                                        too_large=ImageTooLargeError), str(src)
    else:
        raise ImageError(f"unsupported image input of type {type(src).__name__}",
                         hint="pass a file path, encoded image bytes or a PIL image")
    if not data:
        raise ImageError(f"{what} is empty (0 bytes)", hint="pass a complete JPEG, PNG or WebP image")
    return data, what


def video_source(src: Any, limits: MediaLimits = DEFAULT_LIMITS) -> tuple[Any, str]:
    """What the video decoder opens (a path, or the bytes in a file object) and what to call it."""
    if isinstance(src, (bytes, bytearray, memoryview)) or (isinstance(src, str) and src[:5].lower() == "data:"):
        if isinstance(src, str):
            data, what = decode_data_url(src, "video", limits.max_video_bytes, VideoError), "the video data URL"
        else:
            data, what = bytes(src), "the video data"
        if len(data) > limits.max_video_bytes:
            raise VideoError(f"{what} is over the limit of {limits.max_video_bytes / MB:.0f} MiB",
                             hint="pass a shorter video, or its file path")
        if not data:
            raise VideoError(f"{what} is empty (0 bytes)", hint="pass a complete video file")
        return io.BytesIO(data), what
    if isinstance(src, str) and src.startswith(("http://", "https://")):
        raise VideoError(f"video URLs are not downloaded by the runtime: {src[:80]}",
                         hint="download the video and pass a local path or its bytes")
    if not isinstance(src, (str, Path)):
        raise VideoError(f"unsupported video input of type {type(src).__name__}", hint="pass a file path or bytes")
    path = Path(src)
    if not path.is_file():
        raise VideoError(f"video file not found: {path}" if not path.exists() else f"not a file: {path}",
                         hint="check the path")
    return str(path), str(path)


# --------------------------------------------------------------------------------------------- images


def open_image(src: Any, limits: MediaLimits = DEFAULT_LIMITS):
    """``(lazily opened PIL image, what)``: the header is read and its pixel count checked, nothing decoded."""
    from PIL import Image

    if isinstance(src, Image.Image):
        return src, "the image"
    if isinstance(src, DecodedImage):
        return src.image, "the image data"
    data, what = image_bytes(src, limits)
    try:
        with warnings.catch_warnings():  # our own pixel cap below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_many_pixels(what, None, limits) from None
    except Image.UnidentifiedImageError:
        raise unidentified(what, data) from None
    except _DECODE_ERRORS as err:
        raise decode_error(what, err) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise _too_many_pixels(what, (width, height), limits)
    return image, what


def decode_image(src: Any, limits: MediaLimits = DEFAULT_LIMITS):
    """The decoded picture as ``transformers.image_utils.load_image`` gives it: EXIF rotation, then RGB."""
    from PIL import Image, ImageOps

    if isinstance(src, DecodedImage):
        return src.image
    image, what = open_image(src, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError:
        raise _too_many_pixels(what, image.size, limits) from None
    except _DECODE_ERRORS as err:
        raise decode_error(what, err) from None


def checked_image(src: Any, limits: MediaLimits = DEFAULT_LIMITS) -> DecodedImage:
    """Read, cap and decode an image once; the result is its bytes with the picture attached."""
    data, _ = image_bytes(src, limits)
    return DecodedImage(data, decode_image(data, limits))


def _too_many_pixels(what: str, size: tuple[int, int] | None, limits: MediaLimits) -> ImageTooLargeError:
    shown = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return ImageTooLargeError(f"{what} is {shown}, over the limit of {limits.max_image_pixels:,} pixels",
                      hint="downscale the image first")


def unidentified(what: str, data: bytes) -> ImageError:
    head = data[:512]
    fmt = _UNSUPPORTED_SIGNATURES.get(head[4:12])
    if fmt is None and head.lstrip()[:5].lower() in (b"<?xml", b"<svg ", b"<svg>"):
        fmt = "SVG"
    if fmt:
        return ImageError(f"{what} is a {fmt} image, which is not supported", hint="convert it to JPEG or PNG")
    if _looks_like_text(head):
        return ImageError(f"{what} is not an image (it looks like a text file)",
                          hint="pass a JPEG, PNG, WebP, BMP or GIF file")
    return ImageError(f"{what} is not a readable image (unknown format or corrupt data)",
                      hint="pass a JPEG, PNG, WebP, BMP or GIF file")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\r\n\t\f" for ch in text)


def decode_error(what: str, err: BaseException) -> ImageError:
    detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "truncated" in detail.lower() or isinstance(err, EOFError):
        return ImageError(f"{what} is truncated ({detail})", hint="the file is incomplete; re-download or re-save it")
    return ImageError(f"{what} is corrupt and cannot be decoded ({detail})", hint="re-save it as JPEG or PNG")
