"""`smoledge serve` under pressure: one model, a bounded queue, 429s, cancellation, graceful shutdown.

A slow fake engine (one word every few ms) stands in for the model so the timing is under the test's
control; the real-text load test is test_server_load.py.
"""

from __future__ import annotations

import json
import socket
import threading

import httpx2
import openai
import pytest
from test_cloud_fakes import make_config
from test_server_fakes import CountingEngine, start_server, wait_until, words

from smoledge.server_app import ServerSettings

ASK = {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1000}


def _stream_lines(url: str, out: list, first: threading.Event | None = None, body: dict | None = None) -> None:
    """Read an SSE answer into ``out`` (one entry per data line); ``first`` is set at the first content line."""
    try:
        with httpx2.stream("POST", url + "/v1/chat/completions", json={**(body or ASK), "stream": True},
                           timeout=30) as response:
            out.append(response.status_code)
            for line in response.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
                    if first is not None and '"content": "w' in line:
                        first.set()
    except httpx2.HTTPError as err:
        out.append(err)


def _background(*args, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=_stream_lines, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def slow(tmp_path, request):
    """A server over a fake model that takes ``n * delay`` seconds per answer; ``request.param`` = (n, delay, queue)."""
    n, delay, queue = getattr(request, "param", (30, 0.05, 0))
    engine = CountingEngine(words(n), delay_s=delay)
    running = start_server(engine, make_config(tmp_path), queue_size=queue,
                           settings=ServerSettings(default_max_tokens=1000, shutdown_grace_s=5.0))
    yield running, engine
    running.stop()


def test_over_capacity_is_429_with_retry_after_then_it_serves_again(slow):
    running, engine = slow
    out, first = [], threading.Event()
    worker = _background(running.url, out, first)
    assert first.wait(10)
    assert httpx2.get(running.url + "/health", timeout=5).json()["in_flight"] == 1
    busy = running.post(ASK)
    assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"]["type"] == "rate_limit_error" and busy.json()["error"]["code"] == "server_busy"
    with pytest.raises(openai.RateLimitError):
        running.client().chat.completions.create(**ASK)
    worker.join(15)
    assert out[0] == 200 and out[-1] == "[DONE]"
    assert running.client().chat.completions.create(**ASK).choices[0].message.content == words(30)


@pytest.mark.parametrize("slow", [(10, 0.02, 2)], indirect=True)
def test_queued_requests_take_turns_on_the_one_model(slow):
    running, engine = slow
    outs = [[] for _ in range(3)]
    workers = [_background(running.url, out) for out in outs]
    for worker in workers:
        worker.join(20)
    for out in outs:
        assert out[0] == 200 and out[-1] == "[DONE]"
        text = "".join(json.loads(x)["choices"][0]["delta"].get("content", "") for x in out[1:-1])
        assert text == words(10)
    assert engine.streams == 3 and engine.peak_open == 1


@pytest.mark.parametrize("slow", [(400, 0.02, 0)], indirect=True)
def test_a_streaming_client_that_disconnects_cancels_its_generation(slow):
    running, engine = slow
    with httpx2.stream("POST", running.url + "/v1/chat/completions", json={**ASK, "stream": True},
                       timeout=30) as response:
        for line in response.iter_lines():
            if '"content": "w' in line:
                break
    wait_until(lambda: engine.open == 0 and running.service.admission.in_flight == 0, 5, "the cancellation")
    assert engine.produced < 100  # 400 words would take 8 s
    assert httpx2.get(running.url + "/health", timeout=5).json()["waiting_for_model"] == 0


@pytest.mark.parametrize("slow", [(400, 0.02, 1)], indirect=True)
def test_a_waiting_or_running_plain_request_is_cancelled_when_its_client_goes(slow):
    running, engine = slow
    host, port = running.url.removeprefix("http://").split(":")
    body = json.dumps(ASK).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    clients = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
    for sock in clients:  # the first runs, the second waits for the model
        sock.sendall(head + body)
        wait_until(lambda: engine.open == 1, 5, "the first generation")
    wait_until(lambda: running.service.admission.in_flight == 2, 5, "the second request to queue")
    for sock in clients:
        sock.close()
    wait_until(lambda: running.service.admission.in_flight == 0 and engine.open == 0, 5, "both cancellations")
    assert engine.streams == 1 and engine.produced < 100  # the waiting one never ran


@pytest.mark.parametrize("slow", [(20, 0.05, 0)], indirect=True)
def test_graceful_shutdown_finishes_a_request_in_flight(slow):
    running, engine = slow
    out, first = [], threading.Event()
    worker = _background(running.url, out, first)
    assert first.wait(10)
    running.stop()  # what SIGTERM does: stop listening, let in-flight requests finish within the grace
    worker.join(10)
    assert out[0] == 200 and out[-1] == "[DONE]" and engine.produced == 20
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(running.url + "/health", timeout=2)


def test_graceful_shutdown_cancels_what_outlasts_the_grace(tmp_path):
    engine = CountingEngine(words(400), delay_s=0.02)
    running = start_server(engine, make_config(tmp_path), queue_size=2,
                           settings=ServerSettings(default_max_tokens=1000, shutdown_grace_s=0.3))
    outs, firsts = [[], []], [threading.Event(), threading.Event()]
    workers = [_background(running.url, out, first) for out, first in zip(outs, firsts)]
    wait_until(lambda: any(first.is_set() for first in firsts), 10, "the first words")
    running.stop(timeout=10)
    for worker in workers:
        worker.join(10)
    wait_until(lambda: engine.open == 0, 5, "the generation to stop")
    assert engine.produced < 200 and engine.streams == 1  # the queued request never ran
    assert running.service.jobs == set() and running.service.admission.in_flight == 0
    assert all("[DONE]" not in out for out in outs)
