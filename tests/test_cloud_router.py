"""The real cloud client + failover against a real HTTP router on 127.0.0.1 that injects faults."""

from __future__ import annotations

import socket

import pytest
from test_cloud_fakes import CLOUD_TEXT, TOKEN, Reply, make_config, online, request_with_images, router  # noqa: F401

from smoledge.cloud_fallback import CloudFallback, Ledger
from smoledge.cloud_fallback.policy import Decision
from smoledge.errors import (
    CloudAuthError,
    CloudCreditError,
    CloudModelError,
    CloudProtocolError,
    CloudRateLimitError,
    CloudUnavailableError,
)

DECISION = Decision("cloud", "oversize", "17 tiles > 5 allowed on raspberry-pi-5-4gb", fallback_allowed=False)
LARGE, SMALL = "acme/vlm-large:fastest", "acme/vlm-small:fake-provider"


@pytest.fixture
def cloud(tmp_path, router):  # noqa: F811
    sleeps: list[float] = []
    cfg = make_config(tmp_path, router, read_timeout_s=0.3)
    fallback = CloudFallback(cfg.cloud, ledger=Ledger(cfg.ledger.path), project="router-tests",
                             sleep=sleeps.append)
    fallback.sleeps = sleeps
    yield fallback
    fallback.close()


def _run(cloud, targets=(LARGE, SMALL)):
    return "".join(c.text for c in cloud.stream(request_with_images(), targets, DECISION))


def _statuses(cloud):
    return [(e.model, e.status) for e in cloud.ledger.entries()]


def test_streams_an_answer_and_records_provider_tokens_and_cost(cloud, router):  # noqa: F811
    chunks = list(cloud.stream(request_with_images(), (LARGE,), DECISION))
    assert "".join(c.text for c in chunks) == CLOUD_TEXT
    assert len(chunks) == len(CLOUD_TEXT.split()) + 1 and chunks[-1].finish_reason == "stop"
    [entry] = list(cloud.ledger.entries())
    assert (entry.provider, entry.model, entry.status, entry.project) == ("fake-provider", LARGE, "ok", "router-tests")
    assert (entry.tokens_in, entry.tokens_out) == (1200, len(CLOUD_TEXT.split()))
    assert entry.cost_usd == pytest.approx((1200 * 0.5 + 8 * 1.5) / 1e6)
    assert entry.route_code == "oversize" and entry.route_reason == DECISION.reason and entry.latency_s > 0


def test_request_on_the_wire(cloud, router):  # noqa: F811
    _run(cloud)
    [sent] = router.chat_requests()
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}" and sent.headers["X-HF-Bill-To"] == "acme-org"
    assert sent.body["model"] == LARGE and sent.body["stream"] is True
    image, text = sent.body["messages"][0]["content"]
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,") and text["type"] == "text"


def test_429_honours_retry_after_then_succeeds(cloud, router):  # noqa: F811
    router.push(Reply("429", retry_after="1"))
    assert _run(cloud) == CLOUD_TEXT
    assert cloud.sleeps == [1.0]
    assert _statuses(cloud) == [(LARGE, "http_429"), (LARGE, "ok")]


def test_5xx_retried_with_backoff_then_succeeds(cloud, router):  # noqa: F811
    router.push(Reply("500"), Reply("503"))
    assert _run(cloud) == CLOUD_TEXT
    assert len(cloud.sleeps) == 2 and all(0 < s <= 0.005 for s in cloud.sleeps)
    assert _statuses(cloud) == [(LARGE, "http_500"), (LARGE, "http_503"), (LARGE, "ok")]


def test_fails_over_to_the_next_model_after_the_retries(cloud, router):  # noqa: F811
    router.push(*[Reply("429", model="acme/vlm-large")] * 3)
    assert _run(cloud) == CLOUD_TEXT
    assert [s for _, s in _statuses(cloud)] == ["http_429"] * 3 + ["ok"]
    assert _statuses(cloud)[-1][0] == SMALL


def test_all_rate_limited_is_a_rate_limit_error(cloud, router):  # noqa: F811
    router.push(*[Reply("429")] * 6)
    with pytest.raises(CloudRateLimitError, match="no cloud model could answer"):
        _run(cloud)
    assert len(router.chat_requests()) == 6


def test_slow_answer_past_the_timeout_is_retried(cloud, router):  # noqa: F811
    router.push(Reply("slow", delay_s=0.6))
    assert _run(cloud) == CLOUD_TEXT
    assert _statuses(cloud)[0] == (LARGE, "timeout")


def test_connection_dropped_before_any_text_moves_on_without_a_retry(cloud, router):  # noqa: F811
    router.push(Reply("drop_early"))  # after the 200: the provider may be generating (and billing) already
    assert _run(cloud) == CLOUD_TEXT
    assert _statuses(cloud) == [(LARGE, "dropped"), (SMALL, "ok")]


def test_connection_dropped_mid_answer_ends_the_stream_without_a_duplicate(cloud, router):  # noqa: F811
    router.push(Reply("drop"))
    received = []
    with pytest.raises(CloudUnavailableError, match="dropped mid-answer.*not retried, to avoid a duplicated answer"):
        for chunk in cloud.stream(request_with_images(), (LARGE, SMALL), DECISION):
            received.append(chunk.text)
    assert "".join(received) == "A lighthouse on"
    assert len(router.chat_requests()) == 1 and _statuses(cloud) == [(LARGE, "dropped")]


def test_malformed_json_moves_on_to_the_next_model(cloud, router):  # noqa: F811
    router.push(Reply("malformed", model="acme/vlm-large"))
    assert _run(cloud) == CLOUD_TEXT
    assert _statuses(cloud) == [(LARGE, "malformed"), (SMALL, "ok")]


def test_malformed_json_body_is_a_protocol_error(cloud, router):  # noqa: F811
    router.push(Reply("malformed_body"))
    with pytest.raises(CloudProtocolError, match="malformed answer"):
        _run(cloud, targets=(LARGE,))


def test_plain_json_answer_is_accepted(cloud, router):  # noqa: F811
    router.push(Reply("json", text="plain answer"))
    assert _run(cloud) == "plain answer"
    assert list(cloud.ledger.entries())[0].tokens_out == 9


def test_401_stops_at_once_with_a_token_hint(cloud, router):  # noqa: F811
    router.push(Reply("401"))
    with pytest.raises(CloudAuthError, match=r"rejected the Hugging Face token \(HTTP 401\).*HF_TOKEN"):
        _run(cloud)
    assert len(router.chat_requests()) == 1


def test_402_stops_at_once_with_a_billing_hint(cloud, router):  # noqa: F811
    router.push(Reply("402"))
    with pytest.raises(CloudCreditError, match="out of Inference Providers credit.*billing"):
        _run(cloud)
    assert len(router.chat_requests()) == 1


def test_400_model_not_served_fails_over_without_retrying(cloud, router):  # noqa: F811
    router.push(Reply("400", model="acme/vlm-large"))
    assert _run(cloud) == CLOUD_TEXT
    assert _statuses(cloud) == [(LARGE, "http_400"), (SMALL, "ok")]
    router.push(Reply("400"), Reply("400"))
    with pytest.raises(CloudModelError, match="not supported by any provider"):
        _run(cloud, targets=("acme/other-a", "acme/other-b"))


def test_cooldown_skips_a_failing_model_on_the_next_request(cloud, router):  # noqa: F811
    router.push(*[Reply("503", model="acme/vlm-large")] * 3)
    assert _run(cloud) == CLOUD_TEXT
    before = len(router.chat_requests())
    assert _run(cloud) == CLOUD_TEXT
    assert len(router.chat_requests()) == before + 1
    assert router.chat_requests()[-1].body["model"] == SMALL


def test_unreachable_router_is_unavailable(tmp_path, online):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_config(tmp_path, base_url=f"http://127.0.0.1:{port}/v1", attempts=2)
    fb = CloudFallback(cfg.cloud, sleep=lambda s: None)
    with _closing(fb), pytest.raises(CloudUnavailableError, match="cannot reach the cloud router"):
        list(fb.stream(request_with_images(), ("a/b",), DECISION))


def test_token_comes_from_hf_token_and_missing_token_is_an_auth_error(tmp_path, router, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", "hf_from_env_456")
    cfg = make_config(tmp_path, router, token=None)
    with _closing(CloudFallback(cfg.cloud)) as fb:
        list(fb.stream(request_with_images(), (LARGE,), DECISION))
    assert router.chat_requests()[-1].headers["Authorization"] == "Bearer hf_from_env_456"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    fb = CloudFallback(cfg.cloud)
    with _closing(fb), pytest.raises(CloudAuthError, match="no Hugging Face token found"):
        list(fb.stream(request_with_images(), (LARGE,), DECISION))


class _closing:
    def __init__(self, fallback):
        self.fallback = fallback

    def __enter__(self):
        return self.fallback

    def __exit__(self, *exc):
        self.fallback.close()
