"""The benchmark harness: a quick real-text run end to end (JSON + Markdown + PNG with the expected
keys), the GGUF converter against transformers on the tiny model, and the pure parts (aggregation,
targets, report) on a made-up report.  No speed is asserted anywhere."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest

from conftest import run_cli

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _subject(name, peer, figures, size=1e9, bits=4.5, fidelity=None, options=None):
    figs = {k: {"median": v, "min": v * 0.9, "max": v * 1.1, "n": 3, "spread": 0.2} for k, v in figures.items()}
    return {"name": name, "peer": peer, "artifact": "x", "options": options or {}, "size_bytes": size,
            "bits_per_weight": bits, "notes": [], "status": "ok", "figures": figs, "errors": [],
            "fidelity": fidelity}


def _report(size="full"):
    from smoledge.benchmarks.config import Workload

    workload = Workload(contexts=(128, 512), headline_context=512).to_dict()
    ours = _subject("smoledge onnx int4", "smoledge", {"decode_tok_s@512": 20.0, "prefill_tok_s@512": 100.0,
                                                       "vision_s_per_tile": 2.0, "ttft_image_s": 3.0,
                                                       "rss_one_image_mb": 1400.0}, size=1.3e9, bits=4.9,
                    fidelity={"kl_mean": 0.05, "top1_agreement": 0.8})
    q4_0 = _subject("llama.cpp Q4_0", "llamacpp", {"decode_tok_s@512": 30.0, "prefill_tok_s@512": 80.0,
                                                  "ttft_image_s": 4.0}, options={"quant": "Q4_0"},
                    fidelity={"kl_mean": 0.3, "top1_agreement": 0.64})
    q4_k = _subject("llama.cpp Q4_K_M", "llamacpp", {"decode_tok_s@512": 28.0}, bits=5.0,
                    options={"quant": "Q4_K_M"}, fidelity={"kl_mean": 0.06, "top1_agreement": 0.8})
    skipped = [{"peer": "genai", "reason": "r"}]
    return {"size": size, "created": "now", "subjects": [ours, q4_0, q4_k], "skipped": skipped,
            "settings": {"workload": workload, "threads": 2, "repeats": 3, "quick": False},
            "machine": {"cpu": "cpu"}, "load_average": {"before": [1.0], "after": [2.0]}}


def test_targets_report_met_not_met_and_na():
    from smoledge.benchmarks.targets import check_all

    results = {t["target"]: t for t in check_all(_report("full"))}
    assert results["decode"]["met"] is False and results["decode"]["threshold"] == pytest.approx(33.0)
    assert results["prefill"]["met"] is True and results["prefill"]["threshold"] == pytest.approx(96.0)
    assert results["vision"]["met"] is False and results["size"]["met"] is True
    assert results["rss_one_image"]["met"] is True and results["ttft_image"]["met"] is True
    assert results["fidelity"]["met"] is None  # real-text weights only
    realtext = {t["target"]: t for t in check_all(_report("realtext"))}
    assert realtext["fidelity"]["met"] is True and realtext["vision"]["met"] is None


def test_summarise_and_aggregate_median_spread():
    from smoledge.benchmarks.peers import Subject
    from smoledge.benchmarks.runner import aggregate, summarise

    assert summarise([3.0, 1.0, 2.0, None]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3, "spread": 1.0}
    assert summarise([None]) is None
    entry = aggregate(Subject("s", "smoledge", "a"), {"runs": [{"load_s": 1.0}, {"load_s": 3.0}], "errors": []}, None)
    assert entry["status"] == "ok" and entry["figures"]["load_s"]["median"] == 2.0


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed (the [bench] extra)")
def test_report_writes_json_markdown_png(tmp_path):
    from smoledge.benchmarks import report as report_module
    from smoledge.benchmarks.targets import check_all

    report = _report("full")
    report["targets"] = check_all(report)
    paths = report_module.write(report, tmp_path)
    assert json.loads(paths["json"].read_text())["size"] == "full"
    text = paths["markdown"].read_text()
    assert "decode tok/s @512" in text and "NOT met" in text and "genai** skipped" in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Busy machine" not in text


def test_report_says_when_the_machine_was_busy():
    from smoledge.benchmarks.report import markdown
    from smoledge.benchmarks.runner import LoadSampler
    from smoledge.benchmarks.targets import check_all

    with LoadSampler(every_s=0.01) as sampler:
        while len(sampler.samples) < 3:
            pass
    summary = sampler.summary()
    assert summary["n"] >= 3 and summary["max"] >= summary["mean"] >= 0
    report = _report("full")
    report["targets"] = check_all(report)
    report["load_average"]["during"] = {"mean": 3.0, "max": 3.5, "n": 10, "every_s": 5.0}  # 2 threads: quiet
    assert "Busy machine" not in markdown(report)
    report["load_average"]["during"] = {"mean": 5.1, "max": 9.4, "n": 10, "every_s": 5.0}
    assert "load average was 5.1 on average (max 9.4)" in markdown(report)


def test_settings_reject_unknown_peer_and_non_bundle(tmp_path):
    from smoledge.benchmarks.cli import configure_parser, settings_from_args
    from smoledge.errors import ConfigError

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    with pytest.raises(ConfigError, match="unknown peer"):
        settings_from_args(parser.parse_args(["--peers", "nope"]))
    with pytest.raises(ConfigError, match="not a bundle"):
        settings_from_args(parser.parse_args(["--bundle", str(tmp_path)]))
    settings = settings_from_args(parser.parse_args(["--quick", "--peers", ""]))
    assert settings.repeats == 1 and settings.peers == () and settings.workload.decode_tokens == 8


def test_a_profile_adds_a_subject_loaded_with_its_backend_options(tiny_fp32_bundle, tmp_path):
    """--profile P: each of our formats that P sets backend options for is measured twice, as the defaults load it
    and as the device loads it; a profile that does not exist is refused before anything is built."""
    from smoledge.benchmarks.cli import configure_parser, settings_from_args
    from smoledge.benchmarks.peer_smoledge import SmolEdgeEngine, prepare
    from smoledge.benchmarks.peers import PrepareContext
    from smoledge.errors import ConfigError

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    with pytest.raises(ConfigError, match="nope"):
        settings_from_args(parser.parse_args(["--profile", "nope"]))
    assert settings_from_args(parser.parse_args(["--profile", "raspberry-pi-5-4gb"])).profile == "raspberry-pi-5-4gb"
    from smoledge.cloud_fallback.profiles import load_profile

    pi = load_profile("raspberry-pi-5-4gb")
    assert pi.options_for("onnx") == {"vision_session": "exclusive"}
    ctx = PrepareContext("realtext", tmp_path, tmp_path, (tiny_fp32_bundle,), 1, profile=pi)
    plain, device = prepare(ctx)
    assert device.name == f"{plain.name} [raspberry-pi-5-4gb: vision_session=exclusive]"
    assert plain.options == {"format": "onnx"} and device.options["backend"] == {"vision_session": "exclusive"}
    assert SmolEdgeEngine(device, threads=1).backend.options.vision_session == "exclusive"
    assert SmolEdgeEngine(plain, threads=1).backend.options.vision_session == "lazy"
    assert len(prepare(PrepareContext("realtext", tmp_path, tmp_path, (tiny_fp32_bundle,), 1))) == 1


@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (the [bench] extra)")
def test_gguf_text_conversion_matches_transformers(tiny_model_dir, tmp_path):
    """The F16 GGUF written by the harness, run by llama.cpp, gives transformers' next tokens."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForImageTextToText

    from smoledge.benchmarks.gguf_convert import write_text_gguf

    path = write_text_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = list(np.random.default_rng(0).integers(50, 300, 24))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95  # F16 weights: tiny rounding differences only
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9999


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed (the [bench] extra)")
def test_bench_realtext_quick_writes_results(realtext_et_bundle, tmp_path):
    """Our bundle's ONNX graphs and .pte, and llama.cpp (when installed) measured; transformers only as
    the fidelity reference (its fp32 speed pass and the genai builder are the slow peers, left out here)."""
    proc = run_cli("bench", "--size", "realtext", "--bundle", str(realtext_et_bundle), "--quick",
                   "--peers", "llamacpp", "--out", str(tmp_path), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench-realtext-quick.json").read_text())
    assert {"machine", "versions", "settings", "subjects", "skipped", "targets", "timing"} <= set(report)
    assert report["settings"]["threads"] >= 1 and report["versions"]["onnxruntime"]
    ours_by_format = {s["options"]["format"]: s for s in report["subjects"] if s["peer"] == "smoledge"}
    assert set(ours_by_format) == {"onnx", "executorch"}
    pte = ours_by_format["executorch"]
    assert pte["status"] == "ok", pte["errors"]
    for key in ("load_s", "decode_tok_s@256", "rss_peak_mb", "vision_s_per_tile"):
        assert pte["figures"][key]["median"] > 0, key
    assert pte["size_bytes"] > 0 and pte["fidelity"]["top1_agreement"] > 0.3
    ours = ours_by_format["onnx"]
    assert ours["status"] == "ok", ours["errors"]
    for key in ("load_s", "ttft_text_s", "ttft_image_s", "ttft_split_s", "vision_s_per_tile", "rss_one_image_mb",
                "rss_peak_mb", "prefill_tok_s@256", "decode_tok_s@256", "preprocess_image_s"):
        assert ours["figures"][key]["median"] > 0, key
    assert ours["figures"]["tiles_split"]["median"] > 1
    assert 0 <= ours["fidelity"]["kl_mean"] < 2 and ours["fidelity"]["top1_agreement"] > 0.3  # aligned, not junk
    assert ours["size_bytes"] > 0 and ours["bits_per_weight"]
    if HAS_LLAMA:
        q4k = next(s for s in report["subjects"] if s["options"].get("quant") == "Q4_K_M")
        assert q4k["status"] == "ok", q4k["errors"]
        assert q4k["fidelity"]["top1_agreement"] > 0.3  # the conversion is right, not just loadable
        assert q4k["figures"]["ttft_split_s"]["median"] > 0  # vision through libmtmd
    else:
        assert any(s["peer"] == "llamacpp" for s in report["skipped"])
    assert {t["target"] for t in report["targets"]} >= {"decode", "prefill", "fidelity", "ttft_image"}
    markdown = (tmp_path / "bench-realtext-quick.md").read_text()
    assert "| figure |" in markdown and "## Targets" in markdown
    assert (tmp_path / "bench-realtext-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
