"""SmolVLM2 video input without torch: probe, sample, decode and preprocess a clip, and write its prompt text.

The reference is transformers' SmolVLM video path (transformers 5.24), reproduced step by step:

* **decoding** as ``transformers.video_utils.read_video_pyav`` (transformers' ``pyav`` backend): the frame
  count is the stream header's ``frames``, fps its ``average_rate``, duration = frames / fps; frames are
  decoded in order and kept when their index was sampled, as ``rgb24``.  PyAV is an optional extra
  (``pip install -e '.[video]'`` from a clone) imported only when a video is opened.
* **sampling** as ``SmolVLMVideoProcessor.sample_frames`` (``num_frames`` = ``max_frames``, ``fps``,
  ``skip_secs=1``): ``min(round(fps * duration), max_frames)`` frames, evenly spaced, skipping the first and
  last second when the clip is long enough, de-duplicated.
* **pixels** as ``SmolVLMVideoProcessor.resize`` + ``rescale_and_normalize``: the longest edge to
  ``longest_edge`` (the short edge rounded up to even), then squashed to ``tile_size`` square, both with
  Pillow's filter ``resample`` on uint8; then ``(x - mean/rescale) / (std/rescale)`` in float32 (the fused
  form transformers computes).  Frames are never split into tiles.
* **prompt** as ``SmolVLMProcessor.replace_video_token``: an intro naming the frame count in words and the
  duration (H:MM:SS), one ``Frame from MM:SS:`` line + one unsplit image per frame, an outro.

Every setting comes from the bundle manifest's "video" section (:class:`VideoConfig`).  A frame is
preprocessed as soon as it is decoded, so a long 4K clip never holds more than one full-size frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smoledge.errors import ConfigError, VideoError, VideoDecoderMissingError
from smoledge.runtime.media import video_source
from smoledge.runtime.preprocess import LANCZOS, resized_size

VideoSource = str | Path | bytes

MAX_IMAGE_SIZE = 4096  # transformers' cap on the first resize's longest edge
DEFAULT_VIDEO_INTRO = (
    "You are provided the following series of {frame_count} frames from a {video_duration} [H:MM:SS] video.\n"
)
DEFAULT_MEDIA_OUTTRO = "\n\n"
FRAME_TIMESTAMP_MESSAGE = "\nFrame from {timestamp}:"
DEFAULT_FPS = 1.0  # SmolVLM2's video_sampling defaults
DEFAULT_MAX_FRAMES = 64
_HF_CLASS_DEFAULTS = {"size": {"longest_edge": 4 * 364}, "max_image_size": {"longest_edge": 364}}


@dataclass(frozen=True)
class VideoConfig:
    """The manifest's "video" section: how frames are sampled, preprocessed and announced in the prompt.

    ``longest_edge`` is HF's video ``size["longest_edge"]`` (first resize), ``tile_size`` HF's
    ``max_image_size["longest_edge"]`` (the square every frame ends as).  ``chat_template`` is the template
    used for requests that hold a video (None: the bundle's own ``chat_template``).
    """

    tile_size: int
    longest_edge: int
    fps: float = DEFAULT_FPS
    max_frames: int = DEFAULT_MAX_FRAMES
    skip_secs: float = 1.0
    resample: int = LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    video_token: str = "<video>"
    intro: str = DEFAULT_VIDEO_INTRO
    frame_message: str = FRAME_TIMESTAMP_MESSAGE
    outro: str = DEFAULT_MEDIA_OUTTRO
    chat_template: str | None = None

    def __post_init__(self) -> None:
        for name in ("tile_size", "longest_edge", "max_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _config_error(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise _config_error(f"fps must be a positive number, got {self.fps!r}")
        if int(self.resample) not in {int(r) for r in Image.Resampling}:
            raise _config_error(f"unknown resample filter {self.resample!r}")
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or (name == "image_std" and 0.0 in value):
                raise _config_error(f"{name} must be 3 numbers (std non-zero), got {value!r}")
            object.__setattr__(self, name, value)
        try:
            self.intro.format(frame_count="one", video_duration="0:00:01")
            self.frame_message.format(timestamp="00:00")
        except (KeyError, IndexError, ValueError) as err:
            raise _config_error(f"intro / frame_message have a bad placeholder ({err})") from None

    def with_max_frames(self, max_frames: int) -> VideoConfig:
        """The same settings sampling at most ``max_frames`` frames (what transformers' ``num_frames`` sets)."""
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
            raise ConfigError(f"max frames must be a positive integer, got {max_frames!r}", hint="e.g. --max-frames 8")
        return replace(self, max_frames=max_frames)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VideoConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"video config: unknown keys {unknown}",
                              hint="the bundle may be newer than this runtime; upgrade smoledge")
        try:
            return cls(**dict(d))
        except TypeError as err:
            raise _config_error(str(err)) from err

    @classmethod
    def from_hf(cls, d: Mapping[str, Any] | None, *, tile_size: int, chat_template: str | None = None) -> VideoConfig:
        """Read a Hugging Face SmolVLM video processor config as ``SmolVLMVideoProcessor(**d)`` reads it.

        ``d`` is the dict transformers would load (``processor_config.json``'s "video_processor", else
        ``video_preprocessor_config.json``, else ``preprocessor_config.json``); None gives SmolVLM2's
        defaults (1 fps, 64 frames, frames resized straight to ``tile_size``).  As in transformers, a
        ``size`` next to ``video_sampling`` wins over ``video_sampling["video_size"]``.
        """
        if d is None:
            return cls(tile_size=tile_size, longest_edge=tile_size, chat_template=chat_template)
        sampling = d.get("video_sampling") or {}
        size = d.get("size") if "size" in d else sampling.get("video_size", _HF_CLASS_DEFAULTS["size"])
        max_size = d.get("max_image_size", _HF_CLASS_DEFAULTS["max_image_size"])
        for key, value in (("size", size), ("max_image_size", max_size)):
            if not isinstance(value, Mapping) or "longest_edge" not in value:
                raise ConfigError(f"video processor config: {key} must have a 'longest_edge', got {value!r}",
                                  hint="only SmolVLM video processors are supported")
        if not d.get("do_resize", True):
            raise ConfigError("video processor config: do_resize is off", hint="frames must be resized to the tile")
        return cls(
            tile_size=int(max_size["longest_edge"]), longest_edge=int(size["longest_edge"]),
            # a missing / null fps or num_frames takes SmolVLM2's default; 0 is refused by __post_init__
            fps=float(sampling.get("fps", _given(d, "fps", DEFAULT_FPS))),
            max_frames=int(sampling.get("max_frames", _given(d, "num_frames", DEFAULT_MAX_FRAMES))),
            resample=int(d.get("resample", LANCZOS)), do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)), do_normalize=bool(d.get("do_normalize", True)),
            image_mean=_three(d.get("image_mean", 0.5)), image_std=_three(d.get("image_std", 0.5)),
            chat_template=chat_template,
        )


def _given(d: Mapping[str, Any], key: str, default: Any) -> Any:
    return default if d.get(key) is None else d[key]


def _three(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def _config_error(message: str) -> ConfigError:
    return ConfigError(f"video config: {message}", hint="fix the bundle manifest's video section")


# --------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class ClipInfo:
    """What the container header says (transformers' ``VideoMetadata`` from its pyav reader)."""

    total_frames: int
    fps: float
    duration: float
    width: int
    height: int


def sample_indices(info: ClipInfo, max_frames: int, fps: float, skip_secs: float = 1.0) -> np.ndarray:
    """Frame indices to keep, as ``SmolVLMVideoProcessor.sample_frames`` picks them."""
    desired = max(min(int(round(fps * info.duration)), max_frames), 1)
    start, end = 0, info.total_frames - 1
    if skip_secs > 0 and (info.duration - 2 * skip_secs) > (max_frames * fps):
        start = int(skip_secs * info.fps)
        end = int(info.total_frames - skip_secs * info.fps)
    start, end = max(0, start), min(end, info.total_frames - 1)
    if start >= end:
        start, end = 0, info.total_frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


@dataclass(frozen=True)
class VideoPlan:
    """A clip's header and the frames that will be sampled from it: enough to write and measure the prompt."""

    info: ClipInfo
    indices: tuple[int, ...]

    @property
    def frames(self) -> int:
        return len(self.indices)

    @property
    def timestamps(self) -> list[float]:
        return [i / self.info.fps for i in self.indices]


def plan_video(src: VideoSource, cfg: VideoConfig) -> VideoPlan:
    """Read the header of ``src`` and choose its frames; decodes no pixels."""
    with _open_container(src) as (container, stream, what):
        info = _clip_info(container, stream, what)
    return VideoPlan(info, tuple(int(i) for i in sample_indices(info, cfg.max_frames, cfg.fps, cfg.skip_secs)))


# --------------------------------------------------------------------------------------------- prompt

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def _below_thousand(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" and {_below_thousand(rest)}" if rest else "")


def number_words(n: int) -> str:
    """English cardinal words as ``num2words(n)`` writes them, for 0 <= n < 1,000,000 (tests/test_video.py)."""
    if n < 0 or n >= 1_000_000:
        raise VideoError(f"cannot write {n} frames in words", hint="sample fewer frames (--max-frames)")
    if n < 1000:
        return _below_thousand(n)
    thousands, rest = divmod(n, 1000)
    head = f"{_below_thousand(thousands)} thousand"
    if not rest:
        return head
    return f"{head} and {_below_thousand(rest)}" if rest < 100 else f"{head}, {_below_thousand(rest)}"


def video_prompt_string(plan: VideoPlan, cfg: VideoConfig, frame_string: str) -> str:
    """The text that replaces one ``<video>`` placeholder (``SmolVLMProcessor.replace_video_token``).

    ``frame_string`` is one unsplit image's token string (``image_prompt_string(0, 0, ...)``).
    """
    duration = str(timedelta(seconds=int(plan.info.duration)))
    prompt = cfg.intro.format(frame_count=number_words(plan.frames), video_duration=duration)
    for second in plan.timestamps:
        stamp = f"{int(second // 60):02d}:{int(second % 60):02d}"
        prompt += cfg.frame_message.format(timestamp=stamp) + frame_string
    return prompt + cfg.outro


# --------------------------------------------------------------------------------------------- pixels


def frame_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """``video_processing_smolvlm.get_resize_output_image_size``: the first resize's (height, width)."""
    return resized_size(height, width, min(MAX_IMAGE_SIZE, longest_edge))


def frame_tile(frame: np.ndarray, cfg: VideoConfig) -> np.ndarray:
    """One decoded RGB frame (uint8 HWC) -> its ``tile_size`` square, uint8 HWC."""
    image = Image.fromarray(frame)
    height, width = frame_size(image.height, image.width, cfg.longest_edge)
    resample = Image.Resampling(cfg.resample)
    image = image.resize((width, height), resample=resample)
    return np.asarray(image.resize((cfg.tile_size, cfg.tile_size), resample=resample))


def normalize_tiles(tiles: np.ndarray, cfg: VideoConfig) -> np.ndarray:
    """uint8 [F, H, W, 3] -> float32 [F, 3, H, W], with transformers' fused float32 arithmetic."""
    x = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    if cfg.do_rescale and cfg.do_normalize:
        scale = np.float32(1.0 / cfg.rescale_factor)
        mean, std = mean * scale, std * scale
    elif cfg.do_rescale:
        return x * np.float32(cfg.rescale_factor)
    if cfg.do_normalize:
        x = (x - mean[None, :, None, None]) / std[None, :, None, None]
    return x


@dataclass(frozen=True)
class ProcessedVideo:
    plan: VideoPlan  # the frames actually decoded (a header may promise more than the file holds)
    pixel_values: np.ndarray  # float32 [F, 3, tile, tile]


def load_video(src: VideoSource, cfg: VideoConfig) -> ProcessedVideo:
    """Decode the sampled frames of ``src`` and preprocess them, as transformers' SmolVLM video path does."""
    with _open_container(src) as (container, stream, what):
        info = _clip_info(container, stream, what)
        wanted = sample_indices(info, cfg.max_frames, cfg.fps, cfg.skip_secs)
        kept, tiles = _decode(container, what, set(int(i) for i in wanted), int(wanted[-1]), cfg)
    if not tiles:
        raise VideoError(f"{what} has no decodable frames", hint="re-encode the video (e.g. H.264 in MP4)")
    plan = VideoPlan(info, tuple(kept))
    return ProcessedVideo(plan, normalize_tiles(np.stack(tiles), cfg))


def _decode(container, what: str, wanted: set[int], last: int, cfg: VideoConfig) -> tuple[list[int], list]:
    av = _import_av()
    kept, tiles = [], []
    try:
        container.seek(0)
        for i, frame in enumerate(container.decode(video=0)):
            if i > last:
                break
            if i in wanted:
                kept.append(i)
                tiles.append(frame_tile(frame.to_ndarray(format="rgb24"), cfg))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        if not tiles:
            raise _decode_error(what, err) from err
    return kept, tiles  # a stream damaged after its first frames keeps the frames decoded so far


# --------------------------------------------------------------------------------------------- containers


def _import_av():
    try:
        import av
    except ImportError:
        raise VideoDecoderMissingError("video input needs PyAV, which is not installed",
                         hint="install PyAV: pip install -e '.[video]' in the smoledge clone") from None
    return av


@contextmanager
def _open_container(src: VideoSource):
    """``with _open_container(src) as (container, video_stream, what)``; open errors become VideoError."""
    av = _import_av()
    target, what = video_source(src)
    try:
        container = av.open(target)
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise _decode_error(what, err) from err
    try:
        if not container.streams.video:
            raise VideoError(f"{what} has no video stream", hint="pass a video file (MP4, WebM, MOV, ...)")
        yield container, container.streams.video[0], what
    finally:
        container.close()


def _clip_info(container, stream, what: str) -> ClipInfo:
    rate = stream.average_rate or stream.guessed_rate
    if not rate or float(rate) <= 0:
        raise VideoError(f"{what} has no frame rate", hint="re-encode the video (e.g. H.264 in MP4)")
    fps = float(rate)
    total = int(stream.frames or 0)
    if total <= 0:  # some containers (WebM, MKV) carry no frame count: estimate it from the duration
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = (container.duration or 0) / 1e6  # the container's duration is in microseconds
        total = int(round(seconds * fps))
    if total <= 0:
        raise VideoError(f"{what} has no frames", hint="pass a non-empty video")
    return ClipInfo(total_frames=total, fps=fps, duration=total / fps, width=int(stream.width or 0),
                    height=int(stream.height or 0))


def _decode_error(what: str, err: BaseException) -> VideoError:
    detail = " ".join(str(err).split())[:200] or type(err).__name__
    return VideoError(f"{what} is not a readable video ({detail})",
                      hint="pass an MP4, WebM or MOV file; re-encode it if it is damaged")


# --------------------------------------------------------------------------------------------- device fit


def resolve_max_frames(value: str | int | None, device_max_frames: int) -> int | None:
    """``--max-frames`` / ``SMOLEDGE_MAX_FRAMES``: a number, ``auto`` (the device profile's
    ``max_video_frames``, so a long video is downsampled to fit instead of going to the cloud or being
    refused), or None / empty (the bundle's own ``max_frames``)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return int(device_max_frames)
    try:
        frames = int(value)
    except (TypeError, ValueError):
        frames = 0
    if frames < 1:
        raise ConfigError(f"max frames must be a positive integer or 'auto', got {value!r}",
                          hint="e.g. --max-frames 8, or --max-frames auto for the device profile's limit")
    return frames
