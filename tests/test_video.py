"""runtime/video.py, piece by piece, against transformers' SmolVLM video code (no model, no bundle).

The reference is transformers 5.24's own code: ``SmolVLMVideoProcessor.sample_frames`` (frame choice),
``video_processing_smolvlm.get_resize_output_image_size`` (first resize), ``SmolVLMVideoProcessor.__init__``
(which config keys win), ``SmolVLMProcessor.replace_video_token`` (prompt text, with ``num2words``) and
``transformers.video_utils.read_video_pyav`` (decoding).  torchvision cannot be imported beside torch 2.13
here, so nothing that resizes pixels is called in this file; test_video_parity.py covers the pixels.

Synthetic clips are written by the tests with PyAV (libx264 in MP4, libvpx in WebM): PyAV is also the
runtime's decoder and transformers' ``pyav`` backend, so both sides decode the very same frames.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from smoledge.errors import ConfigError, InputError, VideoError
from smoledge.runtime.prompt import ImageTokens, build_prompt, expand_video_tokens, image_prompt_string
from smoledge.runtime.types import Message, TextPart, VideoPart
from smoledge.runtime.video import (
    ClipInfo,
    VideoConfig,
    VideoPlan,
    frame_size,
    load_video,
    number_words,
    plan_video,
    resolve_max_frames,
    sample_indices,
    video_prompt_string,
)

av = pytest.importorskip("av")


def make_clip(path: Path, frames: int, fps: int, width: int = 80, height: int = 48, seed: int = 0) -> Path:
    """A clip whose every frame differs (a bar that moves, a colour that changes, noise), written by PyAV."""
    codec = {".webm": "libvpx", ".mp4": "libx264"}[path.suffix]
    rng = np.random.RandomState(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        y, x = np.mgrid[0:height, 0:width]
        for i in range(frames):
            img = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, (i * 37) % 256)], -1)
            img[:, (i * 3) % width: (i * 3) % width + 6] = (250, 20, 20)
            img = np.clip(img + rng.randint(-20, 20, img.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --------------------------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def hf():
    import importlib

    pytest.importorskip("transformers")
    # imported by module path: the lazy ``transformers.models.smolvlm`` package would ask for torchvision
    return (importlib.import_module("transformers.models.smolvlm.processing_smolvlm"),
            importlib.import_module("transformers.models.smolvlm.video_processing_smolvlm"))


def _hf_video_processor(hf, **kwargs):
    return hf[1].SmolVLMVideoProcessor(**kwargs)


def _metadata(total: int, fps: float):
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps, video_backend="pyav")


# --------------------------------------------------------------------------------------------- sampling


CLIPS = [(1, 30.0), (2, 1.0), (7, 2.0), (35, 10.0), (90, 30.0), (301, 29.97), (1800, 30.0), (7200, 24.0),
         (4000, 25.0), (150, 60.0), (45, 15.0), (10_000, 8.0)]


@pytest.mark.parametrize("total, fps", CLIPS)
@pytest.mark.parametrize("max_frames, target_fps", [(64, 1), (8, 1), (32, 2.0), (1, 1), (64, 0.5), (16, 4)])
def test_sample_indices_match_smolvlm_sample_frames(hf, total, fps, max_frames, target_fps):
    proc = _hf_video_processor(hf)
    ref = proc.sample_frames(_metadata(total, fps), num_frames=max_frames, fps=target_fps)
    ours = sample_indices(ClipInfo(total, fps, total / fps, 0, 0), max_frames, target_fps)
    np.testing.assert_array_equal(ours, ref)


def test_decoding_and_header_match_transformers_pyav_reader(tmp_path):
    from transformers.video_utils import load_video as hf_load_video

    clip = make_clip(tmp_path / "c.mp4", frames=23, fps=6)
    cfg = VideoConfig(tile_size=54, longest_edge=54, fps=2)
    plan = plan_video(clip, cfg)
    wanted = sample_indices(plan.info, cfg.max_frames, cfg.fps)
    video, meta = hf_load_video(str(clip), backend="pyav", sample_indices_fn=lambda metadata, **kw: wanted)
    assert (plan.info.total_frames, plan.info.fps, plan.info.duration) == (meta.total_num_frames, meta.fps,
                                                                           meta.duration)
    assert list(plan.indices) == list(meta.frames_indices) and len(video) == plan.frames == 8


def test_webm_without_a_frame_count_is_estimated_from_its_duration(tmp_path):
    clip = make_clip(tmp_path / "c.webm", frames=20, fps=10)
    with av.open(str(clip)) as container:
        assert container.streams.video[0].frames == 0  # transformers' pyav reader would see 0 frames here
    plan = plan_video(clip, VideoConfig(tile_size=54, longest_edge=54))
    assert plan.info.total_frames == 20 and plan.frames == 2
    assert load_video(clip, VideoConfig(tile_size=54, longest_edge=54)).pixel_values.shape == (2, 3, 54, 54)


# --------------------------------------------------------------------------------------------- config


SMOLVLM2_256M = {  # SmolVLM2-256M-Video-Instruct's preprocessor_config.json
    "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "SmolVLMImageProcessor", "max_image_size": {"longest_edge": 512},
    "processor_class": "SmolVLMProcessor", "resample": 1, "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 2048}, "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}},
}
VIDEO_ONLY = {  # a video_preprocessor_config.json-style dict
    "video_sampling": {"fps": 2, "max_frames": 16, "video_size": {"longest_edge": 384}},
    "max_image_size": {"longest_edge": 384}, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3],
    "resample": 3,
}
SAVED_V5 = {"size": {"longest_edge": 512}, "max_image_size": {"longest_edge": 512}, "num_frames": 32, "fps": 1.5}


@pytest.mark.parametrize("d", [SMOLVLM2_256M, VIDEO_ONLY, SAVED_V5], ids=["legacy", "video-config", "v5-saved"])
def test_config_reads_like_smolvlm_video_processor(hf, d):
    import copy

    ref = _hf_video_processor(hf, **copy.deepcopy(d))
    ours = VideoConfig.from_hf(copy.deepcopy(d), tile_size=999)
    assert ours.longest_edge == ref.size["longest_edge"]  # legacy: 'size' wins over video_size, as in HF
    assert ours.tile_size == ref.max_image_size["longest_edge"]
    assert (ours.fps, ours.max_frames) == (ref.fps, ref.num_frames)
    assert ours.image_mean == tuple(ref.image_mean) and ours.image_std == tuple(ref.image_std)
    assert (ours.resample, ours.rescale_factor) == (int(ref.resample), ref.rescale_factor)
    assert VideoConfig.from_dict(ours.to_dict()) == ours


def test_defaults_without_a_video_processor_are_smolvlm2s():
    cfg = VideoConfig.from_hf(None, tile_size=384, chat_template="T")
    assert (cfg.tile_size, cfg.longest_edge, cfg.fps, cfg.max_frames, cfg.chat_template) == (384, 384, 1.0, 64, "T")


@pytest.mark.parametrize("change, match", [
    ({"max_frames": 0}, "max_frames"), ({"fps": 0}, "fps"), ({"fps": float("nan")}, "fps"),
    ({"image_std": [1, 0, 1]}, "image_std"), ({"resample": 42}, "resample"), ({"intro": "{frames}"}, "placeholder"),
    ({"bogus": 1}, "unknown keys"),
])
def test_bad_video_config_is_a_config_error(change, match):
    d = {**VideoConfig(tile_size=54, longest_edge=54).to_dict(), **change}
    with pytest.raises(ConfigError, match=match):
        VideoConfig.from_dict(d)


def test_max_frames_override_and_resolution():
    cfg = VideoConfig(tile_size=54, longest_edge=54)
    assert cfg.with_max_frames(4).max_frames == 4
    assert resolve_max_frames(None, 8) is None and resolve_max_frames("", 8) is None
    assert resolve_max_frames("auto", 8) == 8 and resolve_max_frames("12", 8) == 12 and resolve_max_frames(3, 8) == 3
    for bad in ("0", "-2", "many", 0):
        with pytest.raises(ConfigError, match="positive integer or 'auto'"):
            resolve_max_frames(bad, 8)
    with pytest.raises(ConfigError):
        cfg.with_max_frames(0)


# --------------------------------------------------------------------------------------------- prompt


def test_number_words_match_num2words():
    num2words = pytest.importorskip("num2words").num2words
    for n in [*range(10_000), *range(10_000, 1_000_000, 997), 999_999]:
        assert number_words(n) == num2words(n), n


@pytest.mark.parametrize("height, width", [(48, 80), (80, 48), (50, 50), (1, 999), (999, 1), (1080, 1920),
                                           (2160, 3840), (37, 101), (101, 37), (5000, 12)])
@pytest.mark.parametrize("longest", [54, 384, 512, 2048, 5000])
def test_frame_size_matches_transformers(hf, height, width, longest):
    import torch

    ref = hf[1].get_resize_output_image_size(torch.zeros(1, 3, height, width), resolution_max_side=longest)
    assert frame_size(height, width, longest) == tuple(ref)


class _Meta:  # what replace_video_token reads off transformers' VideoMetadata
    def __init__(self, plan: VideoPlan):
        self.fps, self.duration, self.timestamps = plan.info.fps, plan.info.duration, plan.timestamps


@pytest.mark.parametrize("total, fps, max_frames", [(35, 10.0, 64), (2, 1.0, 64), (7200, 24.0, 64),
                                                    (4000, 25.0, 8), (90_000, 30.0, 64), (3, 30.0, 64)])
def test_video_prompt_string_matches_replace_video_token(hf, total, fps, max_frames):
    pytest.importorskip("num2words")
    tokens, seq = ImageTokens(), 9
    info = ClipInfo(total, fps, total / fps, 0, 0)
    plan = VideoPlan(info, tuple(int(i) for i in sample_indices(info, max_frames, 1.0)))
    proc = object.__new__(hf[0].SmolVLMProcessor)  # only the attributes replace_video_token reads
    proc.image_seq_len, proc.image_token = seq, tokens.image
    proc.fake_image_token, proc.global_image_token = tokens.fake_image, tokens.global_image
    inputs = {"pixel_values": np.zeros((1, plan.frames)), "video_metadata": [_Meta(plan)]}
    ref = proc.replace_video_token(inputs, video_idx=0)
    ours = video_prompt_string(plan, VideoConfig(tile_size=54, longest_edge=54), image_prompt_string(0, 0, tokens, seq))
    assert ours == ref


def test_video_placeholder_count_must_match():
    with pytest.raises(InputError, match="1 <video> placeholders but 2 videos"):
        expand_video_tokens("a<video>b", ["x", "y"])
    messages = [Message("user", (VideoPart("c.mp4"), TextPart("what?")))]
    no_video_template = "{% for m in messages %}{% for p in m['content'] %}{{ p['type'] }}{% endfor %}{% endfor %}"
    with pytest.raises(InputError, match="0 <video> placeholders but 1 videos"):
        build_prompt(messages, [], no_video_template, ImageTokens(), 9, video_prompts=["x"])
    with pytest.raises(InputError, match="1 videos but 0 video prompts"):
        build_prompt(messages, [], no_video_template, ImageTokens(), 9)


# --------------------------------------------------------------------------------------------- bad input


CFG = VideoConfig(tile_size=54, longest_edge=54)


@pytest.mark.parametrize("make, match", [
    (lambda tmp: tmp / "missing.mp4", "not found"),
    (lambda tmp: tmp, "not a file"),
    (lambda tmp: b"", "empty"),
    (lambda tmp: b"this is not a video at all" * 10, "not a readable video"),
    (lambda tmp: "https://example.com/v.mp4", "not downloaded"),
    (lambda tmp: "data:image/png;base64,AAAA", "unsupported data URL"),
    (lambda tmp: 42, "unsupported video input"),
])
def test_bad_videos_are_one_line_video_errors(tmp_path, make, match):
    with pytest.raises(VideoError, match=match) as info:
        plan_video(make(tmp_path), CFG)
    assert "\n" not in str(info.value) and info.value.hint


def test_an_image_is_not_a_video_stream(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "still.png")
    with pytest.raises(VideoError):
        load_video(tmp_path / "still.png", CFG)


def test_bytes_and_data_urls_decode_like_files(tmp_path):
    import base64

    clip = make_clip(tmp_path / "c.mp4", frames=12, fps=4)
    data = clip.read_bytes()
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    arrays = [load_video(src, CFG).pixel_values for src in (clip, data, url)]
    np.testing.assert_array_equal(arrays[0], arrays[1])
    np.testing.assert_array_equal(arrays[0], arrays[2])


def test_truncated_mp4_is_a_video_error(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", frames=40, fps=10)
    data = clip.read_bytes()
    with pytest.raises(VideoError):
        plan_video(data[: len(data) // 3], CFG)  # the MP4 index (moov) is at the end: unreadable


def test_missing_pyav_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(VideoError, match="needs PyAV") as info:
        plan_video(tmp_path / "x.mp4", CFG)
    assert "pip install -e '.[video]'" in info.value.hint
