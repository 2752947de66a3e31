"""Pure request building for the router's OpenAI-compatible API: no network, no clock.

SmolVLM's chat turns become OpenAI messages: a user turn is a list of content parts (images as
``image_url`` parts holding ``data:`` URLs, videos as ``video_url`` parts, text as ``text`` parts, in the
order of the turn); system and assistant turns become plain strings.  A cloud *target* is a Hub model
id with an optional routing suffix: ``:fastest``, ``:cheapest`` or ``:<provider>``; the router reads
the suffix, so the target is sent as the ``model`` field unchanged.

Images are prepared for upload once per request (``to_openai_messages``), not per attempt: one over
``UploadConfig.max_pixels`` or ``max_bytes``, or in a format the sniffer does not know, is downscaled and
re-encoded as JPEG; a smaller JPEG/PNG/WebP/GIF/BMP is sent as it is.  Videos follow the same rule
(``uploads.video_data_url``): frames over ``max_pixels`` or a file over ``video_max_bytes`` are re-encoded.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoledge import __version__
from smoledge.errors import ImageError
from smoledge.runtime.types import ChatRequest, ImagePart, Message, TextPart, VideoPart

from .config import UploadConfig
from .uploads import video_data_url

ROUTING_POLICIES = ("fastest", "cheapest", "preferred")
_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


@dataclass(frozen=True)
class HttpCall:
    """One HTTP request, fully built.  ``headers`` hold the token, so they are kept out of ``repr``."""

    method: str
    url: str
    headers: dict[str, str] = field(repr=False)
    json: dict[str, Any] | None = field(default=None, repr=False)


def split_target(target: str) -> tuple[str, str | None]:
    """``"org/model:together"`` -> ``("org/model", "together")``; no suffix -> ``(target, None)``."""
    model, sep, suffix = target.partition(":")
    return model, (suffix if sep and suffix else None)


def provider_of(target: str) -> str | None:
    """The provider a target pins, or None when the router picks (no suffix, :fastest, :cheapest)."""
    suffix = split_target(target)[1]
    return None if suffix is None or suffix in ROUTING_POLICIES else suffix


def chat_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def models_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/models"


def auth_headers(token: str, bill_to: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}", "User-Agent": f"smoledge/{__version__}"}
    if bill_to:
        headers["X-HF-Bill-To"] = bill_to
    return headers


def build_chat_call(request: ChatRequest, target: str, *, base_url: str, token: str,
                    bill_to: str | None = None, messages: list[dict[str, Any]] | None = None) -> HttpCall:
    """The POST for one target; pass ``messages`` (from ``to_openai_messages``) to encode the images only once."""
    headers = {**auth_headers(token, bill_to), "Accept": "text/event-stream", "Content-Type": "application/json"}
    return HttpCall("POST", chat_url(base_url), headers, chat_payload(request, target, messages))


def chat_payload(request: ChatRequest, target: str, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    s = request.sampling
    payload: dict[str, Any] = {
        "model": target,
        "messages": to_openai_messages(request.messages) if messages is None else messages,
        "max_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if s.top_p < 1.0:
        payload["top_p"] = s.top_p
    if s.seed is not None:
        payload["seed"] = s.seed
    if s.stop:
        payload["stop"] = list(s.stop)
    return payload


def to_openai_messages(messages: tuple[Message, ...] | list[Message],
                       uploads: UploadConfig | None = None) -> list[dict[str, Any]]:
    uploads = uploads or UploadConfig()
    return [_message(m, uploads) for m in messages]


def _message(message: Message, uploads: UploadConfig) -> dict[str, Any]:
    if message.role != "user":
        if any(not isinstance(p, TextPart) for p in message.content):
            raise ImageError(f"a {message.role} turn holds an image or video",
                             hint="put images and videos in user turns only")
        return {"role": message.role, "content": "".join(p.text for p in message.content)}
    return {"role": "user", "content": [_part(p, uploads) for p in message.content]}


def _part(part: TextPart | ImagePart | VideoPart, uploads: UploadConfig) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        return {"type": "image_url", "image_url": {"url": image_data_url(part.image, uploads)}}
    return {"type": "video_url", "video_url": {"url": video_data_url(part.video, uploads)}}


def image_data_url(image: Any, uploads: UploadConfig | None = None) -> str:
    """A ``data:`` URL for a path, encoded bytes or a PIL image, downscaled and re-encoded where ``uploads`` says."""
    uploads = uploads or UploadConfig()
    if isinstance(image, (str, Path)):
        data: bytes | None = _read(Path(image), ImageError, "image")
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        data = None
    decoded = _decode(data) if data is not None else image
    if not hasattr(decoded, "save") or not hasattr(decoded, "size"):
        raise ImageError(f"cannot send a {type(image).__name__} as an image", hint="pass a path, bytes or PIL image")
    mime = sniff_image_mime(data) if data is not None else None
    width, height = decoded.size
    if mime is not None and width * height <= uploads.max_pixels and len(data) <= uploads.max_bytes:
        return _data_url(mime, data)
    return _data_url("image/jpeg", jpeg_for_upload(decoded, uploads))


def jpeg_for_upload(image: Any, uploads: UploadConfig) -> bytes:
    """``image`` (upright, RGB) within ``max_pixels`` as a JPEG, shrunk further until it fits ``max_bytes``."""
    from PIL import Image, ImageOps

    try:
        image = ImageOps.exif_transpose(image)
        image = image.convert("RGB") if image.mode != "RGB" else image
    except OSError as err:
        raise ImageError("image bytes are not a readable image", hint="send JPEG, PNG, WebP, GIF or BMP") from err
    scale = min(1.0, (uploads.max_pixels / max(1, image.width * image.height)) ** 0.5)
    for _ in range(6):
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        fitted = image.resize(size, Image.Resampling.LANCZOS) if size != image.size else image
        buf = io.BytesIO()
        fitted.save(buf, format="JPEG", quality=uploads.jpeg_quality, optimize=True)
        if buf.tell() <= uploads.max_bytes:
            break
        scale *= 0.75
    return buf.getvalue()


def sniff_image_mime(data: bytes) -> str | None:
    for magic, mime in _IMAGE_MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _read(path: Path, error: type, what: str) -> bytes:
    from smoledge.runtime.media import DEFAULT_LIMITS, read_file

    cap = DEFAULT_LIMITS.max_image_bytes if what == "image" else DEFAULT_LIMITS.max_video_bytes
    return read_file(path, cap, what=what, error=error)


def _decode(data: bytes):
    """The image in ``data``, opened lazily (its size is read; pixels only when it must be re-encoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError("image bytes are not a readable image", hint="send JPEG, PNG, WebP, GIF or BMP") from err


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
