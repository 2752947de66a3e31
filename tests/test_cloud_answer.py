"""The entry point: measure, decide, run locally, fall back to the real client against a real test router."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
from test_cloud_fakes import (  # noqa: F401
    CLOUD_TEXT,
    LOCAL_TEXT,
    PROMPT,
    TOKEN,
    CannedEngine,
    Reply,
    make_config,
    online,
    request_with_images,
    router,
)

from smoledge.cloud_fallback import Ledger, LocalHealth, PolicyConfig, SpeedFigures, answer, answer_text
from smoledge.errors import (
    BackendError,
    CloudDisabledError,
    DeadlineExceededError,
    DegenerateOutputError,
    FallbackFailedError,
    ImageError,
    PromptTooLongError,
    VideoDecoderMissingError,
    VideoError,
)


def test_a_small_request_is_answered_locally(tmp_path, router):  # noqa: F811
    reply = answer_text(request_with_images(1), CannedEngine(), config=make_config(tmp_path, router))
    assert reply.text == LOCAL_TEXT and reply.finish_reason == "stop"
    assert reply.decision.route == "local" and reply.decision.reason.startswith("fits raspberry-pi-5-4gb")
    assert router.chat_requests() == []


def test_an_oversized_image_goes_to_the_cloud_with_the_reason(tmp_path, router):  # noqa: F811
    engine = CannedEngine(tiles_per_image=17)
    result = answer(request_with_images(1), engine, config=make_config(tmp_path, router))
    assert result.decision.route == "cloud"  # known before the first chunk
    assert result.decision.reason == "17 tiles > 5 allowed on raspberry-pi-5-4gb"
    assert "".join(c.text for c in result) == CLOUD_TEXT
    assert engine.streams == 0
    [entry] = Ledger(tmp_path / "ledger.sqlite").entries()
    assert (entry.route_code, entry.route_reason, entry.status) == ("oversize", result.decision.reason, "ok")


def test_never_cloud_refuses_an_oversized_request_with_the_reason(tmp_path, router):  # noqa: F811
    cfg = make_config(tmp_path, router, policy=PolicyConfig(never_cloud=True))
    with pytest.raises(CloudDisabledError, match="17 tiles > 5 allowed on raspberry-pi-5-4gb; never-cloud is on"):
        answer(request_with_images(1), CannedEngine(tiles_per_image=17), config=cfg)
    assert router.requests == []


@pytest.mark.parametrize("failure", [BackendError("onnxruntime: Non-zero status code"), MemoryError("std::bad_alloc"),
                                     DegenerateOutputError("NaN logits at step 0"), RuntimeError("kernel crashed")])
def test_a_local_failure_before_the_first_token_falls_back_transparently(tmp_path, router, failure):  # noqa: F811
    seen = []
    result = answer(request_with_images(1), CannedEngine(fail=failure), config=make_config(tmp_path, router),
                    on_decision=seen.append)
    assert "".join(c.text for c in result) == CLOUD_TEXT
    assert [d.route for d in seen] == ["local", "cloud"] and result.decision is seen[-1]
    assert result.decision.code == "local-failed"
    assert result.decision.reason.startswith("local inference failed before the first token: ")
    assert result.next_health(LocalHealth()).consecutive_failures == 1


def test_a_local_failure_after_the_first_token_ends_the_stream_naming_the_cause(tmp_path, router):  # noqa: F811
    engine = CannedEngine(fail=DegenerateOutputError("NaN logits at step 2"), fail_at=2)
    got = []
    with pytest.raises(DegenerateOutputError, match="NaN logits at step 2; after 2 chunks had been streamed; "
                                                    "not handed to the cloud, to avoid a duplicated answer"):
        for chunk in answer(request_with_images(1), engine, config=make_config(tmp_path, router)):
            got.append(chunk.text)
    assert "".join(got) == "a small" and router.chat_requests() == []


def test_out_of_memory_after_the_first_token_is_a_backend_error(tmp_path, router):  # noqa: F811
    engine = CannedEngine(fail=MemoryError(), fail_at=1)
    with pytest.raises(BackendError, match="local inference failed: out of memory; after 1 chunks"):
        list(answer(request_with_images(1), engine, config=make_config(tmp_path, router)))


def _fast_device(cfg):
    """A profile predicted to meet any deadline, so the run-time deadline is what is tested."""
    return replace(cfg, profile=replace(cfg.profile, speed=SpeedFigures(1e-6, 1e9, 1e9)))


def test_a_missed_first_token_deadline_falls_back_to_the_cloud(tmp_path, router):  # noqa: F811
    cfg = _fast_device(make_config(tmp_path, router, policy=PolicyConfig(first_token_deadline_s=0.1)))
    result = answer(request_with_images(1), CannedEngine(first_delay_s=0.5), config=cfg)
    assert "".join(c.text for c in result) == CLOUD_TEXT
    assert result.decision.reason == ("local inference failed before the first token: "
                                      "no first token from the local engine within 0.1 s "
                                      "(raise --deadline, or use a faster device profile)")


def test_a_total_deadline_passed_mid_answer_ends_the_stream(tmp_path, router):  # noqa: F811
    cfg = _fast_device(make_config(tmp_path, router, policy=PolicyConfig(deadline_s=0.25)))
    with pytest.raises(DeadlineExceededError, match="passed the 0.25 s deadline after 2 chunks"):
        list(answer(request_with_images(1), CannedEngine(delay_s=0.2), config=cfg))
    assert router.chat_requests() == []


def test_local_failing_and_cloud_down_names_both_causes(tmp_path, router):  # noqa: F811
    router.push(*[Reply("503")] * 6)
    cfg = make_config(tmp_path, router)
    with pytest.raises(FallbackFailedError) as info:
        list(answer(request_with_images(1), CannedEngine(fail=MemoryError("std::bad_alloc")), config=cfg))
    message = str(info.value)
    assert message.startswith("local inference failed: MemoryError: std::bad_alloc; cloud fallback failed too: ")
    assert "HTTP 503" in message
    assert isinstance(info.value.local_cause, MemoryError)


def test_local_failing_and_cloud_unreachable_names_both_causes(tmp_path, online):  # noqa: F811
    cfg = make_config(tmp_path, base_url="http://127.0.0.1:9/v1", attempts=1)
    with pytest.raises(FallbackFailedError, match="kernel crashed.*cannot reach the cloud router"):
        list(answer(request_with_images(1), CannedEngine(fail=BackendError("kernel crashed")), config=cfg))


def test_never_cloud_keeps_a_local_failure_local(tmp_path, router):  # noqa: F811
    cfg = make_config(tmp_path, router, policy=PolicyConfig(never_cloud=True))
    with pytest.raises(BackendError, match="kernel crashed; never-cloud is on, so there is no cloud fallback"):
        list(answer(request_with_images(1), CannedEngine(fail=BackendError("kernel crashed")), config=cfg))
    assert router.requests == []


def test_an_oversized_request_the_cloud_cannot_take_says_why_it_went_there(tmp_path, router):  # noqa: F811
    router.push(Reply("402"))
    from smoledge.errors import CloudCreditError

    with pytest.raises(CloudCreditError, match="the request went to the cloud because 17 tiles > 5 allowed"):
        list(answer(request_with_images(1), CannedEngine(tiles_per_image=17), config=make_config(tmp_path, router)))


def test_no_engine_goes_to_the_cloud(tmp_path, router):  # noqa: F811
    reply = answer_text(request_with_images(1), None, config=make_config(tmp_path, router, models=("acme/vlm-large",)))
    assert reply.text == CLOUD_TEXT and reply.decision.reason == "no local bundle loaded"
    assert router.chat_requests()[0].body["model"] == "acme/vlm-large"


def test_measure_errors(tmp_path, router):  # noqa: F811
    cfg = make_config(tmp_path, router)
    with pytest.raises(ImageError):
        answer(request_with_images(1), CannedEngine(measure_error=ImageError("broken JPEG")), config=cfg)
    reply = answer_text(request_with_images(1), CannedEngine(measure_error=RuntimeError("tokenizer crash")), config=cfg)
    assert reply.text == CLOUD_TEXT
    assert reply.decision.reason == "local engine could not measure the request: RuntimeError: tokenizer crash"


def test_input_the_local_runtime_cannot_take_goes_to_the_cloud(tmp_path, router):  # noqa: F811
    engine = CannedEngine(measure_error=PromptTooLongError("prompt too long for this bundle"))
    reply = answer_text(request_with_images(1), engine, config=make_config(tmp_path, router))
    assert reply.text == CLOUD_TEXT and reply.decision.code == "local-unsupported"
    assert reply.decision.reason == "the local runtime cannot take this request: prompt too long for this bundle"
    with pytest.raises(VideoError, match="corrupt"):  # a broken file is the caller's to fix, not the cloud's
        answer(request_with_images(1), CannedEngine(measure_error=VideoError("clip.mp4 is corrupt")),
               config=make_config(tmp_path, router))
    cfg = make_config(tmp_path, router, policy=PolicyConfig(never_cloud=True))
    with pytest.raises(CloudDisabledError, match="prompt too long; never-cloud is on"):
        answer(request_with_images(1), CannedEngine(measure_error=PromptTooLongError("prompt too long")), config=cfg)


def test_a_missing_package_is_an_install_hint_not_an_upload(tmp_path, router):  # noqa: F811
    """18 #8: a missing PyAV sent --video to the cloud (uploading the user's video, spending their credit)."""
    engine = CannedEngine(measure_error=VideoDecoderMissingError("video input needs PyAV, which is not installed",
                                                                 hint="pip install -e '.[video]'"))
    with pytest.raises(VideoDecoderMissingError, match="needs PyAV"):
        answer(request_with_images(1), engine, config=make_config(tmp_path, router))
    assert router.chat_requests() == []


def test_unhealthy_local_engine_is_skipped(tmp_path, router):  # noqa: F811
    health = LocalHealth(consecutive_failures=3, last_error="out of memory")
    engine = CannedEngine()
    reply = answer_text(request_with_images(1), engine, config=make_config(tmp_path, router), health=health)
    assert reply.text == CLOUD_TEXT and engine.streams == 0


def test_prompts_images_and_the_token_are_never_logged_or_stored(tmp_path, router, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    router.push(Reply("429", retry_after="0"))
    cfg = make_config(tmp_path, router)
    answer_text(request_with_images(2), CannedEngine(tiles_per_image=17), config=cfg)
    answer_text(request_with_images(1), CannedEngine(fail=BackendError("boom")), config=cfg)
    assert len(list(Ledger(tmp_path / "ledger.sqlite").entries())) == 3
    files = sorted(p for p in tmp_path.iterdir() if p.is_file())  # the ledger (WAL mode) and the /models listing
    assert {p.name for p in files} <= {"ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", "cloud_models.json"}
    stored = b"".join(p.read_bytes() for p in files)
    for secret in (TOKEN, PROMPT, "harbour", CLOUD_TEXT, "base64", "Too many requests"):
        assert secret.encode() not in stored
        assert secret not in caplog.text
