"""The fidelity report: per graph and end to end, against an fp32 bundle of the same checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from smoledge.fidelity import compare_logits


def test_compare_logits_identical_and_shifted():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 50))
    same = compare_logits(ref, ref)
    assert same.kl_mean == pytest.approx(0, abs=1e-12) and same.top1_agreement == 1.0
    noisy = compare_logits(ref, ref + rng.normal(scale=2.0, size=ref.shape))
    assert noisy.kl_mean > 0.1 and noisy.top1_agreement < 1.0


def test_fidelity_command_on_tiny_bundles(tiny_int4_bundle, tiny_fp32_bundle, tmp_path):
    out = tmp_path / "fidelity.json"
    res = run_cli("fidelity", str(tiny_int4_bundle), "--reference", str(tiny_fp32_bundle), "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "top-1" in res.stdout and "end to end" in res.stdout
    report = json.loads(out.read_text())
    assert 0 < report["end_to_end"]["top1_agreement"] <= 1
    assert report["graphs"]["vision_encoder"]["cosine"] > 0.9
    assert report["bits_per_weight"]["decoder"] < 8


def test_fidelity_of_fp32_against_itself_is_perfect(tiny_fp32_bundle):
    res = run_cli("fidelity", str(tiny_fp32_bundle), "--reference", str(tiny_fp32_bundle))
    assert res.returncode == 0, res.stderr
    assert "top-1 100.0%" in res.stdout
