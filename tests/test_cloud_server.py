"""`smoledge serve`'s local health recovers: after repeated local failures it goes to the cloud, then back.

A real server on 127.0.0.1 (the app in a thread) with a local engine that fails three times and then
works again, and the fake router as its cloud.
"""

from __future__ import annotations

import threading
import time

import httpx2
from test_cloud_fakes import CLOUD_TEXT, LOCAL_TEXT, make_config, router  # noqa: F401
from test_server_fakes import CountingEngine, start_server

from smoledge.cloud_fallback import PolicyConfig
from smoledge.errors import BackendError

COOL_OFF_S = 0.6


class FlakyEngine(CountingEngine):
    """Fails before its first token for the first ``failures`` runs, then answers."""

    def __init__(self, failures: int):
        super().__init__(LOCAL_TEXT)
        self.failures = failures
        self._left = threading.Semaphore(failures)

    def stream(self, request):
        if self._left.acquire(blocking=False):
            self.streams += 1
            raise BackendError("onnxruntime: kernel crashed")
        yield from super().stream(request)


def _ask(running):
    reply = running.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=16)
    return reply.choices[0].message.content, reply.smoledge["route"], reply.smoledge["code"]


def test_local_fails_three_times_then_recovers_within_the_cool_off_plus_one_request(tmp_path, router):  # noqa: F811
    engine = FlakyEngine(failures=3)
    policy = PolicyConfig(local_retry_after_s=COOL_OFF_S, local_retry_every=0)
    running = start_server(engine, make_config(tmp_path, router, profile="auto", attempts=1, policy=policy))
    try:
        assert [_ask(running) for _ in range(3)] == [(CLOUD_TEXT, "cloud", "local-failed")] * 3
        health = httpx2.get(running.url + "/health", timeout=5).json()["local"]
        assert health["consecutive_failures"] == 3 and "kernel crashed" in health["last_error"]
        streams = engine.streams
        assert _ask(running) == (CLOUD_TEXT, "cloud", "local-unhealthy")  # open: local is not even tried
        assert engine.streams == streams
        time.sleep(COOL_OFF_S)
        assert _ask(running) == (LOCAL_TEXT, "local", "fits")  # the half-open try, which succeeds
        assert _ask(running) == (LOCAL_TEXT, "local", "fits")
        assert httpx2.get(running.url + "/health", timeout=5).json()["local"]["consecutive_failures"] == 0
        assert len(router.chat_requests()) == 4
    finally:
        running.stop()


def test_a_silent_cloud_frees_the_servers_admission_slot_within_the_budget(tmp_path, router):  # noqa: F811
    import openai
    import pytest
    from test_cloud_fakes import Reply
    from test_server_fakes import data_url, image_message, png_bytes

    router.push(*[Reply("silent", hold_s=5.0)] * 6)
    config = make_config(tmp_path, router, profile="raspberry-pi-5-4gb", read_timeout_s=10.0, budget_s=1.0)
    running = start_server(CountingEngine(tiles_per_image=17), config)
    try:
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as err:
            running.client().chat.completions.create(model="m", messages=[image_message(data_url(png_bytes()))])
        assert time.monotonic() - started < 1.0 + 1.0
        assert err.value.status_code == 503 and "cloud time budget" in err.value.message
        assert httpx2.get(running.url + "/health", timeout=5).json()["in_flight"] == 0
    finally:
        running.stop()
