"""The routing policy (a pure function), retry/cooldown objects, profiles and the config builder."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
from test_cloud_fakes import MANIFEST

from smoledge.cloud_fallback import PolicyConfig, add_routing_arguments, decide, load_profile, router_config_from_args
from smoledge.cloud_fallback.calibrate import capabilities
from smoledge.cloud_fallback.config import CooldownConfig, RetryConfig, parse_models
from smoledge.cloud_fallback.policy import LocalHealth, estimate, fallback_decision
from smoledge.cloud_fallback.profiles import (
    Calibration,
    MachineInfo,
    SpeedFigures,
    apply_calibration,
    bundle_key,
    device_id,
    legacy_calibrations,
    load_calibration,
    profile_names,
    save_calibration,
)
from smoledge.cloud_fallback.retry import Backoff, Cooldown, parse_retry_after
from smoledge.errors import BackendError, BundleError, ConfigError
from smoledge.runtime.manifest import FileEntry, Manifest
from smoledge.runtime.types import RequestShape

PI4 = load_profile("raspberry-pi-5-4gb")
OK = PolicyConfig()


def shape(prompt=200, new=64, tiles=2, frames=0):
    return RequestShape(prompt_tokens=prompt, max_new_tokens=new, image_tiles=tiles, images=1, video_frames=frames)


def test_small_request_runs_locally_with_a_reason():
    d = decide(shape(), MANIFEST, PI4, LocalHealth(), OK)
    assert (d.route, d.code, d.fallback_allowed) == ("local", "fits", True)
    assert d.reason.startswith("fits raspberry-pi-5-4gb")


def test_too_many_tiles_goes_to_cloud():
    d = decide(shape(tiles=17), MANIFEST, PI4, LocalHealth(), OK)
    assert (d.route, d.code) == ("cloud", "oversize")
    assert d.reason == "17 tiles > 5 allowed on raspberry-pi-5-4gb"


def test_too_many_video_frames_goes_to_cloud():
    d = decide(shape(tiles=0, frames=9), MANIFEST, PI4, LocalHealth(), OK)
    assert d.route == "cloud" and d.reason == "9 video frames > 8 allowed on raspberry-pi-5-4gb"


def test_prompt_plus_new_tokens_over_the_profiles_context():
    d = decide(shape(prompt=4000, new=200, tiles=0), MANIFEST, PI4, LocalHealth(), OK)
    assert d.route == "cloud"
    assert d.reason == "4,000 prompt + 200 new tokens = 4,200 > 4,096 context on raspberry-pi-5-4gb"


def test_prompt_plus_new_tokens_over_the_models_window():
    small = replace(MANIFEST, context_length=2048)
    d = decide(shape(prompt=2000, new=100, tiles=0), small, PI4, LocalHealth(), OK)
    assert d.reason == "2,000 prompt + 100 new tokens = 2,100 > 2,048 the model's context window"


def test_peak_memory_over_budget():
    heavy = replace(MANIFEST, memory=replace(MANIFEST.memory, weight_bytes=2_400_000_000))
    d = decide(shape(), heavy, PI4, LocalHealth(), OK)
    assert d.route == "cloud"
    assert d.reason.startswith("estimated peak memory 2.49 GB > 2.41 GB budget on raspberry-pi-5-4gb")
    assert "weights 2.40 GB + KV cache 0.01 GB + vision 0.08 GB" in d.reason


def test_peak_memory_counts_weights_kv_vision_and_activations():
    manifest = replace(MANIFEST, memory=replace(MANIFEST.memory, activation_bytes=1000))
    est = estimate(shape(prompt=100, new=50, tiles=3), manifest, PI4)
    assert est.peak_memory_bytes == 300_000_000 + 50_000 * 150 + 40_000_000 * 3 + 1000


def test_deadline_prediction_from_the_speed_figures():
    speed = SpeedFigures(tile_encode_s=1.0, prefill_tok_s=100.0, decode_tok_s=10.0, source="calibrated 2026-01-01")
    profile = replace(PI4, speed=speed)
    est = estimate(shape(prompt=200, new=50, tiles=2), MANIFEST, profile)
    assert est.first_token_s == pytest.approx(2.0 + 2.0)
    assert est.total_s == pytest.approx(4.0 + 5.0)
    fast_enough = decide(shape(prompt=200, new=50), MANIFEST, profile, LocalHealth(), PolicyConfig(deadline_s=9.5))
    assert fast_enough.route == "local"
    too_slow = decide(shape(prompt=200, new=50), MANIFEST, profile, LocalHealth(), PolicyConfig(deadline_s=5))
    assert (too_slow.route, too_slow.code, too_slow.kinds) == ("cloud", "deadline", ("deadline",))
    assert too_slow.reason == "predicted 9.0 s locally on raspberry-pi-5-4gb > 5 s deadline"
    first = decide(shape(prompt=200, new=50), MANIFEST, profile, LocalHealth(), PolicyConfig(first_token_deadline_s=2))
    assert first.reason == "predicted first token after 4.0 s on raspberry-pi-5-4gb > 2 s first-token deadline"


def test_every_oversize_reason_is_named():
    d = decide(shape(prompt=5000, tiles=60, frames=10), MANIFEST, PI4, LocalHealth(), PolicyConfig(deadline_s=1))
    parts = d.reason.split("; ")
    assert [p.split(" ")[1] for p in parts[:2]] == ["tiles", "video"]
    assert any("context" in p for p in parts) and any("peak memory" in p for p in parts)
    assert parts[-1].endswith("> 1 s deadline")


def test_never_cloud_refuses_an_oversized_request_and_says_so():
    d = decide(shape(tiles=17), MANIFEST, PI4, LocalHealth(), PolicyConfig(never_cloud=True))
    assert d.route == "refuse" and not d.fallback_allowed
    assert d.reason == "17 tiles > 5 allowed on raspberry-pi-5-4gb; never-cloud is on, so it cannot go to the cloud"


def test_never_cloud_runs_fitting_requests_locally_without_fallback():
    d = decide(shape(), MANIFEST, PI4, LocalHealth(), PolicyConfig(never_cloud=True))
    assert d.route == "local" and not d.fallback_allowed
    assert d.reason.endswith("never-cloud is on, so there is no cloud fallback")


def test_local_health_sends_requests_to_the_cloud():
    down = decide(shape(), MANIFEST, PI4, LocalHealth(available=False, last_error="bundle missing"), OK)
    assert (down.route, down.code) == ("cloud", "local-unhealthy")
    assert down.reason == "local engine unavailable: bundle missing"
    health = LocalHealth()
    for _ in range(3):
        health = health.after(BackendError("out of memory"))
    d = decide(shape(), MANIFEST, PI4, health, OK)
    assert d.route == "cloud" and d.reason == "local inference failed 3 times in a row (last: out of memory)"
    assert health.after(None).consecutive_failures == 0


def test_fallback_decision_names_the_local_failure():
    first = decide(shape(), MANIFEST, PI4, LocalHealth(), OK)
    d = fallback_decision(first, MemoryError("cannot allocate 2 GB"), OK)
    assert (d.route, d.code) == ("cloud", "local-failed")
    assert d.reason == "local inference failed before the first token: MemoryError: cannot allocate 2 GB"
    assert fallback_decision(first, MemoryError(), PolicyConfig(never_cloud=True)).route == "refuse"


def test_manifest_without_memory_figures_is_a_bundle_error():
    # The router takes a typed manifest: a bundle without the memory figures is refused when it is read.
    data = MANIFEST.to_dict()
    del data["memory"]
    with pytest.raises(BundleError, match="memory: missing"):
        Manifest.from_dict(data)


# --- retry and cooldown ------------------------------------------------------------------------

def test_backoff_is_exponential_capped_and_jittered():
    b = Backoff(RetryConfig(attempts=5, base_delay_s=1.0, max_delay_s=4.0, jitter=0.5))
    assert [b.delay(a, retry_after=None, rand=0.0) for a in range(4)] == [1.0, 2.0, 4.0, 4.0]
    assert b.delay(1, retry_after=None, rand=0.999) == pytest.approx(1.001)
    assert b.delay(4, retry_after=None, rand=0.0) is None  # attempts used up


def test_backoff_honours_retry_after_up_to_a_cap():
    b = Backoff(RetryConfig(attempts=3, max_retry_after_s=10.0))
    assert b.delay(0, retry_after=7.0, rand=0.3) == 7.0
    assert b.delay(0, retry_after=11.0, rand=0.3) is None


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("3", now=0) == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("soon", now=0) is None and parse_retry_after(None, now=0) is None


def test_cooldown_after_repeated_failures_then_recovers():
    c = Cooldown(CooldownConfig(failures=2, seconds=60))
    c.failed("m", now=100.0)
    assert c.available("m", now=100.0)
    c.failed("m", now=101.0)
    assert not c.available("m", now=150.0) and c.remaining("m", now=150.0) == pytest.approx(11.0)
    assert c.available("m", now=161.0)
    c.failed("m", now=200.0)
    c.succeeded("m")
    c.failed("m", now=201.0)
    assert c.available("m", now=201.0)


# --- profiles and config -----------------------------------------------------------------------

def test_all_required_profiles_ship_and_load():
    names = profile_names()
    for name in ("raspberry-pi-5-4gb", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "iphone-16-pro",
                 "pixel-9-pro", "auto"):
        assert name in names
    for name in names:
        p = load_profile(name)
        assert p.memory_budget_bytes > 0 and p.max_image_tiles > 0 and p.speed.decode_tok_s > 0


def test_auto_profile_uses_the_detected_machine():
    machine = MachineInfo(ram_bytes=16 * 2**30, cores=8, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    p = load_profile("auto", machine=machine)
    assert p.memory_budget_bytes == int(16 * 2**30 * 0.6)
    assert p.execution_provider == "CUDAExecutionProvider" and p.cores == 8
    assert p.speed.source == "estimated"


def test_stored_calibration_is_per_bundle_and_device(tmp_path):
    other = replace(MANIFEST, files={"onnx/decoder.onnx": FileEntry("ab" * 32, 10)})
    record = Calibration(bundle_key(MANIFEST), "onnx", device_id(), SpeedFigures(0.5, 99.0, 9.0, "calibrated 2026-01-01"),
                         None, "m")
    path = save_calibration(tmp_path, record)
    assert path == tmp_path / "calibration" / bundle_key(MANIFEST) / f"onnx-{device_id()}.json"
    assert load_calibration(tmp_path, bundle_key(MANIFEST), "onnx") == record
    # another bundle, another backend or another device finds nothing: one bundle's figures never serve another
    assert bundle_key(other) != bundle_key(MANIFEST) and load_calibration(tmp_path, bundle_key(other), "onnx") is None
    assert load_calibration(tmp_path, bundle_key(MANIFEST), "executorch") is None
    assert load_calibration(tmp_path, bundle_key(MANIFEST), "onnx", device="riscv64-1c-1g-cpu") is None
    p = apply_calibration(PI4, load_calibration(tmp_path, bundle_key(MANIFEST), "onnx"))
    assert p.speed.prefill_tok_s == 99.0 and p.memory_budget_bytes == PI4.memory_budget_bytes


def test_a_calibration_applies_only_to_the_backend_options_it_was_measured_with(tmp_path):
    """A record keeps the backend options its probes loaded the backend with; the router applies it only where the
    profile loads the backend the same way (an exclusive-mode peak says nothing of a default-mode one)."""
    from smoledge.cloud_fallback.profiles import calibrated_profile

    engine = SimpleNamespace(manifest=MANIFEST, backend=SimpleNamespace(name="onnx"))
    speed = SpeedFigures(0.5, 99.0, 9.0, "calibrated 2026-01-01")
    save_calibration(tmp_path, Calibration(bundle_key(MANIFEST), "onnx", device_id(), speed, None, "m",
                                           {"vision_session": "exclusive"}))
    assert load_calibration(tmp_path, bundle_key(MANIFEST), "onnx").options == {"vision_session": "exclusive"}
    defaults = replace(PI4, backend_options={})
    assert calibrated_profile(defaults, engine, tmp_path).speed == PI4.speed  # measured another way: not applied
    exclusive = replace(PI4, backend_options={"onnx": {"vision_session": "exclusive"}})
    assert calibrated_profile(exclusive, engine, tmp_path).speed == speed


def test_old_per_profile_calibrations_are_ignored(tmp_path):
    """18 #7: a per-profile record applied one bundle's speed to another (34.7 s predicted for a 1.9 s run)."""
    (tmp_path / "calibration").mkdir()
    old = tmp_path / "calibration" / "raspberry-pi-5-4gb.json"
    old.write_text(json.dumps({"tile_encode_s": 9.0, "prefill_tok_s": 1.0, "decode_tok_s": 0.1}))
    assert load_profile("raspberry-pi-5-4gb", cache_dir=tmp_path).speed == PI4.speed
    assert legacy_calibrations(tmp_path) == [old]


def test_unknown_profile_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown device profile 'toaster'"):
        load_profile("toaster")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_routing_arguments(parser)
    return parser.parse_args(argv)


def test_router_config_from_flags_and_environment(tmp_path):
    env = {"SMOLEDGE_CACHE_DIR": str(tmp_path), "SMOLEDGE_CLOUD_BASE_URL": "http://127.0.0.1:1/v1",
           "SMOLEDGE_CLOUD_MODELS": "a/b:cheapest, c/d:together", "SMOLEDGE_BILL_TO": "acme",
           "SMOLEDGE_PROJECT": "from-env", "SMOLEDGE_PROFILE": "pixel-9-pro"}
    argv = ["--profile", "raspberry-pi-5-4gb", "--deadline", "5", "--project", "p1"]
    cfg = router_config_from_args(_parse(argv), env)
    assert cfg.profile.name == "raspberry-pi-5-4gb" and cfg.policy.deadline_s == 5.0
    assert cfg.ledger.project == "p1" and cfg.ledger.path == tmp_path / "cloud_ledger.sqlite"
    assert cfg.cloud.models == ("a/b:cheapest", "c/d:together") and cfg.cloud.bill_to == "acme"
    assert cfg.cloud.base_url == "http://127.0.0.1:1/v1" and not cfg.policy.never_cloud
    from_env = router_config_from_args(_parse([]), env)
    assert from_env.profile.name == "pixel-9-pro" and from_env.ledger.project == "from-env"


def test_never_cloud_from_flag_or_environment(tmp_path):
    env = {"SMOLEDGE_CACHE_DIR": str(tmp_path), "SMOLEDGE_PROFILE": "raspberry-pi-5-8gb"}
    assert router_config_from_args(_parse(["--no-cloud"]), env).policy.never_cloud
    assert router_config_from_args(_parse([]), {**env, "SMOLEDGE_NO_CLOUD": "1"}).policy.never_cloud
    assert not router_config_from_args(_parse([]), {**env, "SMOLEDGE_NO_CLOUD": "0"}).policy.never_cloud
    with pytest.raises(ConfigError, match="SMOLEDGE_NO_CLOUD"):
        router_config_from_args(_parse([]), {**env, "SMOLEDGE_NO_CLOUD": "maybe"})


def test_bad_flags_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--deadline"):
        router_config_from_args(_parse(["--deadline", "0"]), {"SMOLEDGE_CACHE_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="not a Hub model id"):
        parse_models("qwen-vl")


def test_capabilities_of_a_bundle_on_a_device():
    caps = capabilities(MANIFEST, PI4)
    assert caps.weights_fit and caps.typical_tiles == 17
    assert caps.max_tiles == PI4.max_image_tiles and caps.max_tokens == PI4.max_context
    assert caps.typical_total_s > caps.typical_first_token_s > 0
