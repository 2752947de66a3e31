"""The INT4 bundle of the real-text model says real language: Paris, through 'smoledge run'."""

from __future__ import annotations

import pytest

from conftest import PARIS_QUESTION, run_cli, synthetic_image

pytestmark = pytest.mark.slow
QUESTION = PARIS_QUESTION


def test_int4_bundle_answers_paris(realtext_int4_bundle):
    res = run_cli("run", str(realtext_int4_bundle), "--prompt", QUESTION, "--max-new-tokens", "24",
                  "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout, res.stdout


def test_int4_bundle_answers_paris_with_an_image_in_the_turn(realtext_int4_bundle, tmp_path):
    image = tmp_path / "photo.jpg"
    synthetic_image(320, 240).save(image)
    res = run_cli("run", str(realtext_int4_bundle), "--image", str(image), "--prompt", QUESTION,
                  "--max-new-tokens", "24", "--stream", "--stats", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout, res.stdout
    assert "1 tiles" in res.stderr  # the demo model's processor does not split


def test_manifest_carries_chatml_and_its_stop_token(realtext_int4_bundle):
    import json

    manifest = json.loads((realtext_int4_bundle / "manifest.json").read_text())
    assert "<|im_start|>" in manifest["chat_template"]
    assert manifest["tokens"]["eos_token"] == "<|im_end|>"
    assert manifest["tokens"]["eos_token_id"] in manifest["generation"]["eos_token_ids"]
