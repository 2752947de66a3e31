"""--deadline (18 #7): an uncalibrated or marginal prediction tries local first; a request handed to the cloud
falls back to local when the cloud fails and local can still answer within what is left; a refusal names the
flags that fix it.  The cloud is the fake router on 127.0.0.1; the local engine a CannedEngine."""

from __future__ import annotations

import time

import pytest
from test_cloud_fakes import LOCAL_TEXT, CannedEngine, Reply, make_config, request_with_images, router  # noqa: F401

from smoledge.cloud_fallback import PolicyConfig, answer_text
from smoledge.cloud_fallback.answer import answer
from smoledge.cloud_fallback.policy import LocalHealth
from smoledge.cloud_fallback.profiles import (Calibration, SpeedFigures, bundle_key, device_id, load_profile,
                                             save_calibration)
from smoledge.errors import CloudDisabledError, FallbackFailedError

SLOW = SpeedFigures(tile_encode_s=1.0, prefill_tok_s=20.0, decode_tok_s=2.0, source="calibrated 2026-12-01")


def _calibrate(cache_dir, speed: SpeedFigures = SLOW) -> None:
    """A stored calibration of the CannedEngine's bundle on this device (what `doctor --profile
    raspberry-pi-5-4gb --calibrate` writes: measured with that profile's backend options)."""
    options = load_profile("raspberry-pi-5-4gb").options_for("onnx")
    save_calibration(cache_dir, Calibration(bundle_key(CannedEngine().manifest), "onnx", device_id(), speed, None,
                                            options=options))


def test_an_uncalibrated_prediction_over_the_deadline_tries_local_first(tmp_path, router):  # noqa: F811
    # The Pi profile's own figures predict ~10 s for this request; they were never measured on this device.
    cfg = make_config(tmp_path, router, policy=PolicyConfig(deadline_s=2))
    reply = answer_text(request_with_images(1), CannedEngine(), config=cfg)
    assert reply.text == LOCAL_TEXT and reply.decision.route == "local"
    assert "> 2 s deadline, but the prediction is not calibrated on this device, so local is tried first" \
        in reply.decision.reason
    assert router.chat_requests() == []


def test_a_calibrated_prediction_clearly_over_goes_to_the_cloud(tmp_path, router):  # noqa: F811
    _calibrate(tmp_path)
    reply = answer_text(request_with_images(1), CannedEngine(), config=make_config(tmp_path, router,
                                                                                 policy=PolicyConfig(deadline_s=5)))
    assert reply.decision.route == "cloud" and reply.decisions[0].code == "deadline"
    assert reply.decision.reason.startswith("predicted ") and "> 5 s deadline" in reply.decision.reason


def test_a_calibrated_prediction_within_the_margin_tries_local(tmp_path, router):  # noqa: F811
    _calibrate(tmp_path, SpeedFigures(0.1, 1000.0, 20.0, source="calibrated 2026-12-01"))  # ~1.9 s predicted
    cfg = make_config(tmp_path, router, policy=PolicyConfig(deadline_s=1.5))
    reply = answer_text(request_with_images(1), CannedEngine(), config=cfg)
    assert reply.decision.route == "local" and "within the prediction's margin" in reply.decision.reason


def test_a_cloud_failure_falls_back_to_local_within_what_is_left(tmp_path, router):  # noqa: F811
    # Sent away because local missed its deadline three times; the cloud is down; 30 s are left.
    router.push(*[Reply("503")] * 6)
    cfg = make_config(tmp_path, router, attempts=1, policy=PolicyConfig(deadline_s=30))
    reply = answer_text(request_with_images(1), CannedEngine(), config=cfg, health=LocalHealth(deadline_misses=3))
    assert reply.text == LOCAL_TEXT
    assert [d.route for d in reply.decisions] == ["cloud", "local"]
    assert reply.decision.code == "cloud-failed"
    assert reply.decision.reason.startswith("the cloud failed (")
    assert "answered locally within the" in reply.decision.reason and "of the 30 s deadline" in reply.decision.reason
    assert len(router.chat_requests()) >= 1


def test_no_local_fallback_when_the_calibrated_prediction_cannot_make_what_is_left(tmp_path, router):  # noqa: F811
    _calibrate(tmp_path)  # ~25 s predicted locally
    router.push(*[Reply("503")] * 6)
    cfg = make_config(tmp_path, router, attempts=1, policy=PolicyConfig(deadline_s=8))
    engine = CannedEngine()
    with pytest.raises(Exception, match="503"):
        answer_text(request_with_images(1), engine, config=cfg, health=LocalHealth(deadline_misses=3))
    assert engine.streams == 0


def test_the_local_fallback_is_bounded_by_the_deadline(tmp_path, router):  # noqa: F811
    router.push(*[Reply("503")] * 6)
    cfg = make_config(tmp_path, router, attempts=1, policy=PolicyConfig(deadline_s=1.0))
    start = time.monotonic()
    with pytest.raises(FallbackFailedError, match="no first token from the local engine within 1 s"):
        answer_text(request_with_images(1), CannedEngine(first_delay_s=3.0), config=cfg,
                    health=LocalHealth(deadline_misses=3))
    assert time.monotonic() - start < 2.5


def test_a_refusal_names_the_flags_that_fix_it(tmp_path, router):  # noqa: F811
    _calibrate(tmp_path)
    cfg = make_config(tmp_path, router, policy=PolicyConfig(deadline_s=2, never_cloud=True))
    with pytest.raises(CloudDisabledError) as info:
        answer(request_with_images(1), CannedEngine(), config=cfg)
    assert "raise --deadline" in info.value.hint and "--no-cloud" in info.value.hint
    cfg = make_config(tmp_path, router, policy=PolicyConfig(never_cloud=True))
    with pytest.raises(CloudDisabledError) as info:
        answer(request_with_images(1), CannedEngine(tiles_per_image=17), config=cfg)
    assert "--max-tiles auto" in info.value.hint
    with pytest.raises(CloudDisabledError) as info:
        answer(request_with_images(1), CannedEngine(tiles_per_image=0, frames=12), config=cfg)
    assert "--max-frames auto" in info.value.hint
    assert router.requests == []
