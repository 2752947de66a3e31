"""Plain data types shared by the runtime, the cloud fallback and the server.

A request is a list of chat turns whose content is text and image parts (OpenAI-style), plus the
generation settings.  Nothing here imports a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from PIL import Image


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImagePart:
    """An image: a path, raw encoded bytes, or an already decoded PIL image."""

    image: Union[str, Path, bytes, Image.Image]
    type: Literal["image"] = "image"


@dataclass(frozen=True)
class VideoPart:
    video: Union[str, Path, bytes]
    type: Literal["video"] = "video"


Part = Union[TextPart, ImagePart, VideoPart]


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant"]
    content: tuple[Part, ...]

    @staticmethod
    def user(text: str, images: list | tuple = ()) -> "Message":
        """A user turn with the images first, then the text (SmolVLM's usual layout)."""
        return Message("user", tuple(ImagePart(i) for i in images) + (TextPart(text),))


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are picked.  temperature == 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def images(self) -> list:
        return [p.image for m in self.messages for p in m.content if isinstance(p, ImagePart)]

    def videos(self) -> list:
        return [p.video for m in self.messages for p in m.content if isinstance(p, VideoPart)]


@dataclass(frozen=True)
class StreamChunk:
    """One step of a streamed answer: the new text (may be empty while a UTF-8 character is incomplete)."""

    text: str
    token_id: int | None = None
    finish_reason: Literal["stop", "length", None] = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tiles: int = 0
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True)
class RequestShape:
    """What a request costs, measured without running the model (the routing policy's input).

    ``image_tiles`` counts every tile the vision encoder would see (split tiles + global images);
    ``video_frames`` the frames after sampling; ``prompt_tokens`` the expanded prompt length.
    """

    prompt_tokens: int
    max_new_tokens: int
    image_tiles: int = 0
    images: int = 0
    video_frames: int = 0
