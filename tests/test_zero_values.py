"""A configured 0 is never silently read as "the default": it is honoured where it means something, or
refused with a one-line error naming the field."""

from __future__ import annotations

import pytest

from smoledge.errors import ConfigError
from smoledge.runtime.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES, VideoConfig


def test_executorch_max_context_len_zero_is_refused_not_full(tiny_model_and_processor):
    from smoledge.export.target_executorch import ExecutorchTargetOptions, context_len

    model, _ = tiny_model_and_processor
    window = model.config.text_config.max_position_embeddings
    with pytest.raises(ConfigError, match="max_context_len must be at least 16, got 0"):
        context_len(model, ExecutorchTargetOptions(max_context_len=0))
    assert context_len(model, ExecutorchTargetOptions(max_context_len=None)) == window
    assert context_len(model, ExecutorchTargetOptions(max_context_len=64)) == 64


@pytest.mark.parametrize(("key", "field"), [("fps", "fps"), ("num_frames", "max_frames")])
def test_video_fps_or_frames_zero_is_refused_naming_the_field(key, field):
    with pytest.raises(ConfigError, match=f"video config: {field} must be a positive"):
        VideoConfig.from_hf({key: 0}, tile_size=512)


def test_video_fps_and_frames_absent_or_null_take_smolvlm2_defaults():
    for d in ({}, {"fps": None, "num_frames": None}):
        config = VideoConfig.from_hf(d, tile_size=512)
        assert (config.fps, config.max_frames) == (DEFAULT_FPS, DEFAULT_MAX_FRAMES)
    assert VideoConfig.from_hf({"fps": 2, "num_frames": 5}, tile_size=512).max_frames == 5
