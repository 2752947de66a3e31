"""Pure request building for the router's OpenAI-compatible API: no network, no clock.

SmolVLM's chat turns become OpenAI messages: a user turn is a list of content parts (images as
``image_url`` parts holding ``data:`` URLs, videos as ``video_url`` parts, text as ``text`` parts, in the
order of the turn); system and assistant turns become plain strings.  A cloud *target* is a Hub model
id with an optional routing suffix: ``:fastest``, ``:cheapest`` or ``:<provider>``; the router reads
the suffix, so the target is sent as the ``model`` field unchanged.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoledge import __version__
from smoledge.errors import ImageError, VideoError
from smoledge.runtime.types import ChatRequest, ImagePart, Message, TextPart, VideoPart

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
                    bill_to: str | None = None) -> HttpCall:
    headers = {**auth_headers(token, bill_to), "Accept": "text/event-stream", "Content-Type": "application/json"}
    return HttpCall("POST", chat_url(base_url), headers, chat_payload(request, target))


def chat_payload(request: ChatRequest, target: str) -> dict[str, Any]:
    s = request.sampling
    payload: dict[str, Any] = {
        "model": target,
        "messages": to_openai_messages(request.messages),
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


def to_openai_messages(messages: tuple[Message, ...] | list[Message]) -> list[dict[str, Any]]:
    return [_message(m) for m in messages]


def _message(message: Message) -> dict[str, Any]:
    if message.role != "user":
        if any(not isinstance(p, TextPart) for p in message.content):
            raise ImageError(f"a {message.role} turn holds an image or video",
                             hint="put images and videos in user turns only")
        return {"role": message.role, "content": "".join(p.text for p in message.content)}
    return {"role": "user", "content": [_part(p) for p in message.content]}


def _part(part: TextPart | ImagePart | VideoPart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        return {"type": "image_url", "image_url": {"url": image_data_url(part.image)}}
    return {"type": "video_url", "video_url": {"url": video_data_url(part.video)}}


def image_data_url(image: Any) -> str:
    """A ``data:`` URL for a path, encoded bytes or a PIL image (re-encoded only when the format is unknown)."""
    if isinstance(image, (str, Path)):
        data = _read(Path(image), ImageError, "image")
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        return _pil_data_url(image)
    mime = sniff_image_mime(data)
    if mime is None:
        return _pil_data_url(_decode(data))
    return _data_url(mime, data)


def video_data_url(video: Any) -> str:
    if isinstance(video, (str, Path)):
        path = Path(video)
        data = _read(path, VideoError, "video")
        mime = {".webm": "video/webm", ".mov": "video/quicktime"}.get(path.suffix.lower(), "video/mp4")
        return _data_url(mime, data)
    if isinstance(video, (bytes, bytearray)):
        return _data_url("video/mp4", bytes(video))
    raise VideoError(f"cannot send a {type(video).__name__} video to the cloud", hint="pass a file path or bytes")


def sniff_image_mime(data: bytes) -> str | None:
    for magic, mime in _IMAGE_MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _read(path: Path, error: type, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}", hint=f"check the {what} path") from err


def _decode(data: bytes):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError("image bytes are not a readable image", hint="send JPEG, PNG, WebP, GIF or BMP") from err


def _pil_data_url(image: Any) -> str:
    if not hasattr(image, "save") or not hasattr(image, "mode"):
        raise ImageError(f"cannot send a {type(image).__name__} as an image", hint="pass a path, bytes or PIL image")
    buf = io.BytesIO()
    if image.mode == "RGB":
        image.save(buf, format="JPEG", quality=92)
        return _data_url("image/jpeg", buf.getvalue())
    image.save(buf, format="PNG")
    return _data_url("image/png", buf.getvalue())


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
