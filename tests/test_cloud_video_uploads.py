"""Issue 16 J for videos: a video is re-encoded once per request (PyAV) to what the substitute can use,
against the fake router on 127.0.0.1; a small one goes unchanged; without PyAV a big one is never sent."""

from __future__ import annotations

import base64
import io
import sys
from dataclasses import replace

import numpy as np
import pytest
from test_cloud_fakes import CLOUD_TEXT, Reply, make_config, router  # noqa: F401

from smoledge.cloud_fallback import CloudFallback, UploadConfig, router_config_from_args
from smoledge.cloud_fallback import uploads as uploads_module
from smoledge.cloud_fallback.policy import Decision
from smoledge.errors import VideoDecoderMissingError, VideoError
from smoledge.runtime.types import ChatRequest, Message, SamplingConfig, TextPart, VideoPart

av = pytest.importorskip("av")

DECISION = Decision("cloud", "oversize", "a video on raspberry-pi-5-4gb", fallback_allowed=False)
LARGE = "acme/vlm-large:fastest"


def _clip(width: int, height: int, seconds: int = 2, fps: int = 8) -> bytes:
    """A noisy H.264 MP4 of ``seconds`` at ``fps``."""
    out, rng = io.BytesIO(), np.random.default_rng(0)
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(seconds * fps):
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    return out.getvalue()


def _cloud(tmp_path, router, uploads: UploadConfig):  # noqa: F811
    cfg = make_config(tmp_path, router)
    return CloudFallback.from_config(replace(cfg, cloud=replace(cfg.cloud, uploads=uploads)), sleep=lambda s: None)


def _ask(cloud, video: bytes) -> str:
    request = ChatRequest((Message("user", (VideoPart(video), TextPart("what happens?"))),),
                          SamplingConfig(max_new_tokens=16))
    return "".join(c.text for c in cloud.stream(request, (LARGE,), DECISION))


def _sent_videos(router) -> list[bytes]:  # noqa: F811
    urls = [r.body["messages"][0]["content"][0]["video_url"]["url"] for r in router.chat_requests()]
    assert all(u.startswith("data:video/mp4;base64,") for u in urls)
    return [base64.b64decode(u.split(",", 1)[1]) for u in urls]


def _frames(data: bytes) -> list[tuple[int, int]]:
    with av.open(io.BytesIO(data)) as container:
        return [(f.width, f.height) for f in container.decode(video=0)]


def test_j_a_big_video_is_reencoded_within_the_limit_once_for_every_attempt(tmp_path, router, monkeypatch):  # noqa: F811
    clip = _clip(320, 240)
    encodes = []
    real = uploads_module.mp4_for_upload
    monkeypatch.setattr(uploads_module, "mp4_for_upload", lambda *a: encodes.append(1) or real(*a))
    router.push(*[Reply("503", model="acme/vlm-large")] * 2)
    cloud = _cloud(tmp_path, router, UploadConfig(max_pixels=20_000))
    try:
        assert _ask(cloud, clip) == CLOUD_TEXT
    finally:
        cloud.close()
    sent = _sent_videos(router)
    assert len(sent) == 3 and len(set(sent)) == 1 and encodes == [1]
    frames = _frames(sent[0])
    assert len(frames) == 2  # 2 s at the local path's 1 fps, not the clip's 16 frames
    assert all(w * h <= 20_000 and abs(w / h - 4 / 3) < 0.05 for w, h in frames)
    assert len(sent[0]) < len(clip)


def test_j_a_small_video_goes_unchanged(tmp_path, router):  # noqa: F811
    clip = _clip(96, 64)
    cloud = _cloud(tmp_path, router, UploadConfig())
    try:
        assert _ask(cloud, clip) == CLOUD_TEXT
    finally:
        cloud.close()
    assert _sent_videos(router) == [clip]


def test_j_a_video_over_the_byte_cap_keeps_its_size_but_only_the_sampled_frames():
    clip = _clip(160, 120, fps=12)
    url = uploads_module.video_data_url(clip, UploadConfig(video_max_bytes=len(clip) - 1, video_fps=2.0))
    frames = _frames(base64.b64decode(url.split(",", 1)[1]))
    assert frames == [(160, 120)] * 4


def test_j_a_video_that_cannot_fit_is_refused_and_nothing_is_sent(tmp_path, router):  # noqa: F811
    cloud = _cloud(tmp_path, router, UploadConfig(video_max_bytes=200))
    try:
        with pytest.raises(VideoError, match="over the upload limit") as info:
            _ask(cloud, _clip(160, 120))
    finally:
        cloud.close()
    assert "SMOLEDGE_UPLOAD_VIDEO_MAX_BYTES" in info.value.hint and router.chat_requests() == []


def test_j_without_pyav_a_video_goes_only_within_the_byte_cap(monkeypatch):
    clip = _clip(320, 240, seconds=1)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError, as when not installed
    small_cap = UploadConfig(video_max_bytes=len(clip) - 1)
    with pytest.raises(VideoDecoderMissingError, match="cannot be re-encoded without PyAV") as info:
        uploads_module.video_data_url(clip, small_cap)
    assert info.value.hint == "install PyAV: pip install -e '.[video]' in the smoledge clone"
    url = uploads_module.video_data_url(clip, UploadConfig(max_pixels=100, video_max_bytes=len(clip)))
    assert base64.b64decode(url.split(",", 1)[1]) == clip


def test_j_upload_limits_come_from_the_environment(tmp_path):
    import argparse

    env = {"SMOLEDGE_CACHE_DIR": str(tmp_path), "SMOLEDGE_UPLOAD_MAX_PIXELS": "20000",
           "SMOLEDGE_UPLOAD_MAX_BYTES": "30000", "SMOLEDGE_UPLOAD_VIDEO_MAX_BYTES": "400000"}
    uploads = router_config_from_args(argparse.Namespace(), env).cloud.uploads
    assert (uploads.max_pixels, uploads.max_bytes, uploads.video_max_bytes) == (20_000, 30_000, 400_000)
    with pytest.raises(Exception, match="SMOLEDGE_UPLOAD_MAX_PIXELS"):
        router_config_from_args(argparse.Namespace(), {**env, "SMOLEDGE_UPLOAD_MAX_PIXELS": "lots"})
