"""The real-text model's bundle with the default recipe (int4-mixed) says real language: Paris, through
'smoledge run', greedy."""

from __future__ import annotations

import pytest

from conftest import PARIS_QUESTION, run_cli, synthetic_image

pytestmark = pytest.mark.slow
QUESTION = PARIS_QUESTION


def test_default_bundle_answers_paris(realtext_default_bundle):
    res = run_cli("run", str(realtext_default_bundle), "--prompt", QUESTION, "--max-new-tokens", "24",
                  "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout, res.stdout


def test_default_bundle_answers_paris_with_an_image_in_the_turn(realtext_default_bundle, tmp_path):
    image = tmp_path / "photo.jpg"
    synthetic_image(320, 240).save(image)
    res = run_cli("run", str(realtext_default_bundle), "--image", str(image), "--prompt", QUESTION,
                  "--max-new-tokens", "24", "--stream", "--stats", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout, res.stdout
    assert "1 tiles" in res.stderr  # the demo model's processor does not split


def test_manifest_carries_chatml_and_its_stop_token(realtext_default_bundle):
    import json

    manifest = json.loads((realtext_default_bundle / "manifest.json").read_text())
    assert "<|im_start|>" in manifest["chat_template"]
    assert manifest["tokens"]["eos_token"] == "<|im_end|>"
    assert manifest["tokens"]["eos_token_id"] in manifest["generation"]["eos_token_ids"]


def test_the_default_bundle_records_the_calibrated_recipe(realtext_default_bundle):
    from smoledge.runtime.bundle import open_bundle

    section = open_bundle(realtext_default_bundle, verify=False).artifact("onnx")
    assert section.recipe_name == "int4-mixed" and section.recipe["calibration"]["sha256"]
    assert section.recipe["formats"] == {"executorch": "int4", "coreml": "int4"}
    res = run_cli("bundle", "info", str(realtext_default_bundle))
    assert res.returncode == 0 and "onnx       recipe int4-mixed," in res.stdout, res.stdout
