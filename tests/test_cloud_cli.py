"""`smoledge usage` and `smoledge doctor`, and the two-line wiring of `smoledge run`'s routing flags."""

from __future__ import annotations

import argparse
import csv
import io
import json

import pytest
from test_cloud_fakes import CLOUD_TEXT, TOKEN, CannedEngine, request_with_images, router  # noqa: F401

from smoledge import cli
from smoledge.cloud_fallback import add_routing_arguments, answer_text, load_profile, router_config_from_args
from smoledge import doctor
from smoledge.cloud_fallback.calibrate import calibrate


@pytest.fixture
def env(tmp_path, router, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SMOLEDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SMOLEDGE_CLOUD_BASE_URL", router.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("SMOLEDGE_NO_CLOUD", raising=False)
    monkeypatch.delenv("SMOLEDGE_CLOUD_MODELS", raising=False)
    monkeypatch.delenv("SMOLEDGE_PROFILE", raising=False)
    return tmp_path


def _run_like_smoledge_run(argv):
    """What `smoledge run` does with its routing flags: two lines of wiring."""
    parser = argparse.ArgumentParser()
    add_routing_arguments(parser)
    config = router_config_from_args(parser.parse_args(argv))
    return answer_text(request_with_images(1), CannedEngine(tiles_per_image=17), config=config)


def test_usage_shows_the_calls_per_project_and_exports_csv(env, capsys, tmp_path):
    for project in ("alpha", "alpha", "beta"):
        reply = _run_like_smoledge_run(["--profile", "raspberry-pi-5-4gb", "--project", project])
        assert reply.text == CLOUD_TEXT and reply.decision.reason == "17 tiles > 5 allowed on raspberry-pi-5-4gb"
    capsys.readouterr()

    assert cli.main(["usage"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["project", "calls", "ok"]
    assert lines[1].split()[:5] == ["alpha", "2", "2", "2,400", "16"]
    assert lines[2].split()[:3] == ["beta", "1", "1"] and lines[3].split()[:2] == ["TOTAL", "3"]

    assert cli.main(["usage", "--by", "model"]) == 0
    assert "acme/vlm-large:fastest" in capsys.readouterr().out

    out = tmp_path / "usage.csv"
    assert cli.main(["usage", "--csv", str(out), "--project", "alpha"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 and {r["project"] for r in rows} == {"alpha"}
    assert rows[0]["provider"] == "fake-provider" and float(rows[0]["cost_usd"]) > 0
    assert rows[0]["route_reason"] == "17 tiles > 5 allowed on raspberry-pi-5-4gb"
    assert TOKEN not in out.read_text()


def test_usage_with_an_empty_ledger(env, capsys):
    assert cli.main(["usage", "--by", "day"]) == 0
    assert "no cloud calls recorded" in capsys.readouterr().out


def test_no_cloud_flag_refuses_with_the_reason(env, capsys, router):  # noqa: F811
    from smoledge.errors import CloudDisabledError

    with pytest.raises(CloudDisabledError, match="17 tiles > 5 allowed on raspberry-pi-5-4gb; never-cloud is on"):
        _run_like_smoledge_run(["--profile", "raspberry-pi-5-4gb", "--no-cloud"])
    assert router.requests == []


def test_doctor_without_a_bundle(env, capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("this machine: ") and "CPUExecutionProvider" in out and "profile auto" in out
    assert cli.main(["doctor", "--list"]) == 0
    assert "raspberry-pi-5-4gb" in capsys.readouterr().out
    assert cli.main(["doctor", "--json", "--profile", "jetson-orin-nano-8gb"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["profile"]["execution_provider"] == "CUDAExecutionProvider" and report["machine"]["cores"] >= 1


def test_doctor_calibrate_needs_a_bundle(env, capsys):
    assert cli.main(["doctor", "--calibrate"]) == 2
    assert "--calibrate needs a bundle" in capsys.readouterr().err


def test_calibration_measures_the_engine():
    speed = calibrate(CannedEngine(first_delay_s=0.02, delay_s=0.005))
    assert speed.prefill_tok_s > 0 and speed.decode_tok_s > 0 and speed.tile_encode_s >= 0
    assert speed.source.startswith("calibrated ")


def test_doctor_calibrates_a_bundle_and_stores_it_per_device(env, capsys, monkeypatch):
    loaded = []

    def load_engine(bundle, options=None):
        loaded.append(options)
        return CannedEngine(first_delay_s=0.01, delay_s=0.002)

    monkeypatch.setattr(doctor, "load_engine", load_engine)
    assert cli.main(["doctor", "--bundle", "some/bundle", "--calibrate", "--profile", "raspberry-pi-5-8gb"]) == 0
    out = capsys.readouterr().out
    assert "calibration stored in" in out and "bundle some/bundle (HuggingFaceTB/SmolVLM2-256M-Video-Instruct)" in out
    from smoledge.cloud_fallback.profiles import bundle_key, load_calibration

    record = load_calibration(env, bundle_key(CannedEngine().manifest), "onnx")  # per bundle and device
    assert record.speed.source.startswith("calibrated") and record.memory is None  # no bundle folder to probe
    assert loaded == [{}] and record.options == {}
    # the 4 GB Pi loads the backend its own way: the 8 GB record is not applied there, and says why
    assert cli.main(["doctor", "--bundle", "some/bundle", "--profile", "raspberry-pi-5-4gb"]) == 0
    out = capsys.readouterr().out
    assert loaded[-1] == {"vision_session": "exclusive"}
    assert "calibration of the bundle is not applied: measured with backend options the defaults" in out
    assert cli.main(["doctor", "--bundle", "some/bundle", "--calibrate", "--profile", "raspberry-pi-5-4gb"]) == 0
    assert load_calibration(env, bundle_key(CannedEngine().manifest), "onnx").options == loaded[-1]


def test_doctor_with_a_bundle_and_no_runtime_says_what_to_do(env, capsys):
    code = cli.main(["doctor", "--bundle", "some/bundle"])
    err = capsys.readouterr().err
    assert code == 2 and ("runtime" in err or "bundle" in err)


def test_cli_modules_import_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, smoledge.doctor, smoledge.usage;"
            "print([m for m in ('httpx2', 'onnxruntime', 'torch', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_usage_csv_to_stdout(env, capsys):
    _run_like_smoledge_run(["--profile", "raspberry-pi-5-4gb", "--project", "gamma"])
    capsys.readouterr()
    assert cli.main(["usage", "--csv", "-"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0][:3] == ["time", "day", "project"] and rows[1][2] == "gamma"


def test_doctor_says_the_cloud_is_off_when_hf_hub_offline_is_set(env, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["doctor"]) == 0
    assert "cloud fallback: OFF (HF_HUB_OFFLINE)" in capsys.readouterr().out
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert cli.main(["doctor"]) == 0
    assert "cloud fallback: on: token present" in capsys.readouterr().out  # tests/test_doctor_cloud.py: the rest
