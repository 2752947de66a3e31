"""``smoledge run --video``: local answers, and long videos routed by the device profile.

A video whose sampled frames exceed the profile's ``max_video_frames`` goes to the cloud with the reason on
stderr (the cloud is the fake router of test_cloud_fakes.py on 127.0.0.1); with never-cloud it is refused
with the same reason, unless ``--max-frames N|auto`` (or ``SMOLEDGE_MAX_FRAMES``) tells the device to sample
fewer frames, in which case it is downsampled and answered locally.
"""

from __future__ import annotations

import base64
import re
import sys

import pytest
from test_cloud_fakes import CLOUD_TEXT, TOKEN, router  # noqa: F401
from test_video import make_clip

from smoledge import cli

PI = "raspberry-pi-5-4gb"  # max_video_frames 8


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clips") / "long.mp4", frames=24, fps=2, width=32, height=24)  # 12 s


def _run(bundle, clip, *extra):
    return cli.main(["run", str(bundle), "--video", str(clip), "--prompt", "What happens?", "--max-new-tokens", "4",
                     "--temperature", "0", *extra])


def test_run_answers_a_video_locally(tiny_fp32_bundle, tmp_path, capsys):
    clip = make_clip(tmp_path / "c.mp4", frames=30, fps=10)
    assert _run(tiny_fp32_bundle, clip, "--stats") == 0
    out = capsys.readouterr()
    assert out.out.strip()
    assert "[route: local - fits auto: 3 tiles/frames" in out.err and " 3 tiles," in out.err


def test_long_video_goes_to_the_cloud_with_the_reason(tiny_fp32_bundle, long_clip, router, monkeypatch,  # noqa: F811
                                                      tmp_path, capsys):
    monkeypatch.setenv("SMOLEDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SMOLEDGE_CLOUD_BASE_URL", router.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("SMOLEDGE_NO_CLOUD", raising=False)
    assert _run(tiny_fp32_bundle, long_clip, "--profile", PI) == 0
    out = capsys.readouterr()
    assert f"[route: cloud - 12 video frames > 8 allowed on {PI}]" in out.err
    assert out.out.strip() == CLOUD_TEXT
    sent = router.chat_requests()[-1].body["messages"][-1]["content"]
    video = next(part for part in sent if part["type"] == "video_url")
    assert base64.b64decode(video["video_url"]["url"].split(",", 1)[1]) == long_clip.read_bytes()


def test_never_cloud_refuses_a_long_video(tiny_fp32_bundle, long_clip, capsys):
    assert _run(tiny_fp32_bundle, long_clip, "--profile", PI, "--no-cloud") == 2
    err = capsys.readouterr().err
    assert f"12 video frames > 8 allowed on {PI}; never-cloud is on" in err and "Traceback" not in err


@pytest.mark.parametrize("how, frames", [(("--max-frames", "auto"), 8), (("--max-frames", "5"), 5), ((), 4)])
def test_never_cloud_downsamples_when_told(tiny_fp32_bundle, long_clip, monkeypatch, capsys, how, frames):
    monkeypatch.setenv("SMOLEDGE_MAX_FRAMES", "4")  # the config; a flag wins over it
    assert _run(tiny_fp32_bundle, long_clip, "--profile", PI, "--no-cloud", "--stats", *how) == 0
    out = capsys.readouterr()
    assert f"[route: local - fits {PI}: {frames} tiles/frames" in out.err and f" {frames} tiles," in out.err
    # answered locally: tokens were generated (a random model's 4 tokens may all decode to blanks or
    # special tokens, so the printed text itself can be empty)
    assert re.search(r"\[onnx: \d+ prompt tokens, \d+ tiles, [1-4] new tokens", out.err), out.err


def test_bad_max_frames_is_a_config_error(tiny_fp32_bundle, long_clip, capsys):
    assert _run(tiny_fp32_bundle, long_clip, "--max-frames", "0") == 2
    assert "positive integer or 'auto'" in capsys.readouterr().err


def test_without_pyav_a_video_is_refused_with_the_reason(tiny_fp32_bundle, long_clip, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "av", None)
    assert _run(tiny_fp32_bundle, long_clip, "--no-cloud") == 2
    assert "video input needs PyAV" in capsys.readouterr().err
