"""Videos prepared for upload to the router, once per request (``to_openai_messages`` calls this).

A video within ``UploadConfig.max_pixels`` per frame and ``video_max_bytes`` goes as it is.  A larger one
is re-encoded with PyAV (``pip install -e '.[video]'`` from a clone) to an MP4 (H.264, MPEG-4 Part 2 where this
FFmpeg has no libx264) holding only the frames the local video path would sample (``video_fps``,
``video_max_frames``, as ``runtime.video.sample_indices`` picks them), each within ``max_pixels``, shrunk
further until the file fits ``video_max_bytes``.  Without PyAV nothing can be measured or re-encoded: a
video within ``video_max_bytes`` still goes as it is, a larger one is refused (never sent whole).
"""

from __future__ import annotations

import base64
import io
from fractions import Fraction
from pathlib import Path
from typing import Any

from smoledge.errors import VideoDecoderMissingError, VideoError

from .config import UploadConfig

MB = 1_000_000
_MS = Fraction(1, 1000)
_MIMES = {".webm": "video/webm", ".mov": "video/quicktime"}


def video_data_url(video: Any, uploads: UploadConfig | None = None) -> str:
    """A ``data:`` URL for a video path or bytes, re-encoded where ``uploads`` says."""
    uploads = uploads or UploadConfig()
    data, mime = _video_bytes(video)
    try:
        import av  # noqa: F401
    except ImportError:
        if len(data) <= uploads.video_max_bytes:
            return _data_url(mime, data)
        raise VideoDecoderMissingError(
            f"the video is {len(data) / MB:.1f} MB, over the upload limit of {uploads.video_max_bytes / MB:.1f} MB,"
            " and cannot be re-encoded without PyAV",
            hint="install PyAV: pip install -e '.[video]' in the smoledge clone") from None
    plan = _plan(str(video) if isinstance(video, (str, Path)) else data, uploads)  # errors name the path
    if plan.info.width * plan.info.height <= uploads.max_pixels and len(data) <= uploads.video_max_bytes:
        return _data_url(mime, data)
    return _data_url("video/mp4", mp4_for_upload(data, plan, uploads))


def mp4_for_upload(data: bytes, plan: Any, uploads: UploadConfig) -> bytes:
    """The sampled frames of ``plan`` as an MP4 within ``max_pixels`` a frame, shrunk until it fits the bytes."""
    info = plan.info
    scale = min(1.0, (uploads.max_pixels / max(1, info.width * info.height)) ** 0.5)
    for _ in range(4):
        size = (_even(info.width * scale), _even(info.height * scale))
        encoded = _encode(data, plan, size, uploads)
        if len(encoded) <= uploads.video_max_bytes:
            return encoded
        scale *= 0.7
    raise VideoError(f"the video is still {len(encoded) / MB:.1f} MB re-encoded, over the upload limit of "
                     f"{uploads.video_max_bytes / MB:.1f} MB",
                     hint="send a shorter clip, or raise SMOLEDGE_UPLOAD_VIDEO_MAX_BYTES")


def _plan(source: str | bytes, uploads: UploadConfig):
    from smoledge.runtime.video import VideoConfig, plan_video

    cfg = VideoConfig(tile_size=1, longest_edge=1, fps=uploads.video_fps, max_frames=uploads.video_max_frames,
                      skip_secs=0.0)
    return plan_video(source, cfg)


def _encode(data: bytes, plan: Any, size: tuple[int, int], uploads: UploadConfig) -> bytes:
    import av

    wanted = set(plan.indices)
    rate = Fraction(max(1, len(wanted)), 1) / Fraction(plan.info.duration).limit_denominator(1000)
    out = io.BytesIO()
    try:
        with av.open(io.BytesIO(data)) as src, av.open(out, mode="w", format="mp4") as dst:
            stream = _video_stream(av, dst, rate.limit_denominator(1000), size, uploads, plan.info.duration)
            for i, frame in enumerate(src.decode(video=0)):
                if i > plan.indices[-1]:
                    break
                if i in wanted:
                    dst.mux(stream.encode(_frame_at(frame, i / plan.info.fps, size)))
            dst.mux(stream.encode(None))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise VideoError(f"the video could not be re-encoded for upload ({detail})",
                         hint="pass an MP4, WebM or MOV file; re-encode it if it is damaged") from err
    return out.getvalue()


def _video_stream(av, container, rate: Fraction, size: tuple[int, int], uploads: UploadConfig, seconds: float):
    if "libx264" in av.codecs_available:
        stream = container.add_stream("libx264", rate=rate)
        stream.options = {"crf": str(uploads.video_crf), "preset": "veryfast"}
    else:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.bit_rate = max(100_000, int(uploads.video_max_bytes * 8 * 0.8 / max(seconds, 1.0)))
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    stream.codec_context.time_base = _MS
    return stream


def _frame_at(frame: Any, seconds: float, size: tuple[int, int]):
    """``frame`` scaled to ``size``, stamped with its time in the original clip (so the clip keeps its length)."""
    out = frame.reformat(width=size[0], height=size[1], format="yuv420p")
    out.pts, out.time_base = round(seconds * 1000), _MS
    return out


def _video_bytes(video: Any) -> tuple[bytes, str]:
    if isinstance(video, (str, Path)):
        from smoledge.runtime.media import DEFAULT_LIMITS, read_file

        path = Path(video)
        data = read_file(path, DEFAULT_LIMITS.max_video_bytes, what="video", error=VideoError)
        return data, _MIMES.get(path.suffix.lower(), "video/mp4")
    if isinstance(video, (bytes, bytearray)):
        return bytes(video), "video/mp4"
    raise VideoError(f"cannot send a {type(video).__name__} video to the cloud", hint="pass a file path or bytes")


def _even(x: float) -> int:
    return max(2, int(x) // 2 * 2)


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
