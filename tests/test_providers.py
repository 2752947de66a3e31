"""Short execution-provider names (--providers cuda) and the GPU check script, on this CPU-only machine."""

from __future__ import annotations

import json

import onnxruntime
import pytest

from conftest import PARIS_QUESTION, run_cli
from smoledge.benchmarks import device_check
from smoledge.runtime.backends.onnx import provider_names


def test_short_names_map_to_onnxruntime_names():
    assert provider_names(["cuda", " TensorRT ", "coreml", "nnapi", "xnnpack", "cpu"]) == (
        "CUDAExecutionProvider", "TensorrtExecutionProvider", "CoreMLExecutionProvider",
        "NnapiExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider")
    assert provider_names(["CUDAExecutionProvider", "", "MyCustomExecutionProvider"]) == (
        "CUDAExecutionProvider", "MyCustomExecutionProvider")


def test_short_name_runs_on_cpu(tiny_int4_bundle):
    proc = run_cli("run", str(tiny_int4_bundle), "--prompt", PARIS_QUESTION, "--max-new-tokens", "4",
                   "--providers", "cpu")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="has CUDA")
def test_missing_provider_is_a_one_line_error_with_its_full_name(tiny_int4_bundle):
    proc = run_cli("run", str(tiny_int4_bundle), "--prompt", "hi", "--providers", "cuda")
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "CUDAExecutionProvider" in proc.stderr and "Traceback" not in proc.stderr


def test_first_difference():
    assert device_check.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert device_check.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert device_check.first_difference([1, 2], [1, 2, 3]) == 2


def test_device_check_records_answers_and_speed(tiny_int4_bundle, tmp_path):
    """The GPU script's whole path with CPU standing in for the GPU: both answers equal, JSON written."""
    out = tmp_path / "check.json"
    rc = device_check.main(["--provider", "cpu", "--bundle", f"tiny={tiny_int4_bundle}", "--max-new-tokens", "6",
                            "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0
    assert result["provider"] == "CPUExecutionProvider"
    assert [bool(c["images"]) for c in result["checks"]] == [False, True]
    for check in result["checks"]:
        assert check["identical"] and check["first_difference"] is None and check["gpu_provider_used"]
        assert check["gpu"]["tokens"] == check["cpu"]["tokens"] and len(check["cpu"]["tokens"]) >= 1
        assert check["cpu"]["decode_tokens_per_s"] >= 0 and check["gpu"]["time_to_first_token_s"] > 0


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="has CUDA")
def test_device_check_fails_without_the_gpu_provider(tiny_int4_bundle, capsys):
    assert device_check.main(["--provider", "cuda", "--bundle", f"tiny={tiny_int4_bundle}"]) == 1
    assert "CUDAExecutionProvider" in capsys.readouterr().err
