"""The real-text demo model (real SmolLM2-135M-Instruct decoder, random vision tower) answers about a
synthetic clip through ``smoledge run --video`` without error.  Its vision tower is random, so the answer
cannot be about the pixels; what is checked is that the whole path (decode, sample, preprocess, the video
prompt, a 64-token-per-frame vision encoder, int4 decoding) runs and produces text.  Slow: it reuses the
session's real-text int4 bundle."""

from __future__ import annotations

import pytest
from test_video import make_clip

from smoledge import cli


@pytest.mark.slow
def test_realtext_model_answers_about_a_clip(realtext_int4_bundle, tmp_path, capsys):
    clip = make_clip(tmp_path / "clip.mp4", frames=30, fps=10, width=96, height=64)  # 3 s: 3 frames
    rc = cli.main(["run", str(realtext_int4_bundle), "--video", str(clip), "--prompt",
                   "Describe this video in one sentence.", "--max-new-tokens", "24", "--stats",
                   "--temperature", "0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert " 3 tiles," in out.err
    answer = out.out.strip()
    assert len(answer.split()) >= 3 and any(ch.isalpha() for ch in answer), answer
