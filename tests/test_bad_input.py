"""Bad input gets a one-line error, a non-zero exit and no traceback; a broken bundle is caught."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli, synthetic_image


@pytest.fixture()
def bundle_copy(tiny_int4_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_int4_bundle, dst)
    return dst


def _assert_clean_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {result.stderr!r}"
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_image(tiny_int4_bundle, tmp_path):
    res = run_cli("run", str(tiny_int4_bundle), "--image", str(tmp_path / "nope.jpg"), "--prompt", "hi")
    _assert_clean_error(res, "not found")


def test_corrupt_image(tiny_int4_bundle, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage" * 10)
    _assert_clean_error(run_cli("run", str(tiny_int4_bundle), "--image", str(bad), "--prompt", "hi"))


def test_truncated_image(tiny_int4_bundle, tmp_path):
    good = tmp_path / "good.jpg"
    synthetic_image(300, 200).save(good, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:400])
    _assert_clean_error(run_cli("run", str(tiny_int4_bundle), "--image", str(cut), "--prompt", "hi"))


def test_unsupported_format(tiny_int4_bundle, tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("this is not an image at all\n" * 5)
    _assert_clean_error(run_cli("run", str(tiny_int4_bundle), "--image", str(txt), "--prompt", "hi"))


def test_nonexistent_bundle(tmp_path):
    _assert_clean_error(run_cli("run", str(tmp_path / "missing"), "--prompt", "hi"), "no bundle")


def test_folder_that_is_not_a_bundle(tmp_path):
    _assert_clean_error(run_cli("run", str(tmp_path), "--prompt", "hi"), "not a smoledge bundle")


def test_tampered_artifact(bundle_copy):
    graph = bundle_copy / "onnx" / "decoder_model_merged.onnx.data"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    line = _assert_clean_error(run_cli("run", str(bundle_copy), "--prompt", "hi"), "sha256")
    assert "decoder_model_merged.onnx.data" in line
    _assert_clean_error(run_cli("bundle", "verify", str(bundle_copy)), "sha256")


def test_truncated_artifact(bundle_copy):
    graph = bundle_copy / "onnx" / "vision_encoder.onnx"
    graph.write_bytes(graph.read_bytes()[:100])
    _assert_clean_error(run_cli("run", str(bundle_copy), "--prompt", "hi"), "truncated")


def test_manifest_of_newer_schema(bundle_copy):
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    _assert_clean_error(run_cli("bundle", "info", str(bundle_copy)), "schema 99", "upgrade")


def test_corrupt_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{ not json")
    _assert_clean_error(run_cli("run", str(bundle_copy), "--prompt", "hi"), "manifest")


def test_prompt_over_context_window(tiny_int4_bundle):
    long_prompt = "the quick brown fox " * 2000  # the tiny model's context is 4096 tokens
    _assert_clean_error(run_cli("run", str(tiny_int4_bundle), "--prompt", long_prompt), "context window")


def test_bad_sampling_flag(tiny_int4_bundle):
    _assert_clean_error(run_cli("run", str(tiny_int4_bundle), "--prompt", "hi", "--max-new-tokens", "0"),
                        "max-new-tokens")


def test_debug_shows_traceback(tiny_int4_bundle, tmp_path):
    res = run_cli("--debug", "run", str(tiny_int4_bundle), "--image", str(tmp_path / "x.jpg"), "--prompt", "hi")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_bundle_verify_and_info(tiny_int4_bundle):
    res = run_cli("bundle", "verify", str(tiny_int4_bundle))
    assert res.returncode == 0 and "ok:" in res.stdout
    info = run_cli("bundle", "info", str(tiny_int4_bundle))
    assert info.returncode == 0
    assert "decoder_model_merged" in info.stdout and "bits/weight" in info.stdout
