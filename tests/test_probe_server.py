"""Issue 17's hostile probe against `smoledge serve`, kept as tests: each reproduces a defect (D1, D2, D3,
D10, D12, D13, D14) and checks the fix.  All traffic is on 127.0.0.1, every wait is bounded."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx2
import pytest
from test_cloud_fakes import TOKEN, Reply, make_config, router  # noqa: F401
from test_server_fakes import CountingEngine, data_url, module_router, png_bytes, start_server  # noqa: F401

from smoledge.cloud_fallback import PolicyConfig
from smoledge.server_app import ServerSettings
from smoledge.runtime.server_conn import ConnectionLimits
from smoledge.runtime.server_guard import AccessRules

HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def tiny_pipe(tiny_int4_bundle):
    from smoledge.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_int4_bundle)


@pytest.fixture(scope="module")
def tiny(tiny_pipe, module_router, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("probe"), module_router, profile="auto",
                         policy=PolicyConfig(never_cloud=True))
    settings = ServerSettings(default_max_tokens=8, connections=ConnectionLimits(header_timeout_s=1.0))
    running = start_server(tiny_pipe, config, settings=settings, model_id="tiny")
    yield running
    running.stop()


def test_d1_bad_seeds_never_disable_the_local_model(tiny):
    for _ in range(4):
        r = tiny.post({**HI, "seed": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    ok = tiny.post({**HI, "seed": 3})
    assert ok.status_code == 200 and ok.json()["smoledge"]["route"] == "local", ok.text
    assert httpx2.get(tiny.url + "/health", timeout=5).json()["local"]["consecutive_failures"] == 0


BAD_PARAMETERS = {  # raw bodies: JSON allows what the probe sent
    "seed -1": '{"messages": [{"role": "user", "content": "hi"}], "seed": -1}',
    "seed 2**70": '{"messages": [{"role": "user", "content": "hi"}], "seed": %d}' % 2**70,
    "temperature NaN": '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "temperature Infinity": '{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
    "empty stop": '{"messages": [{"role": "user", "content": "hi"}], "stop": ""}',
    "lone surrogate": '{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
}


@pytest.mark.parametrize("name", list(BAD_PARAMETERS))
def test_d5_bad_parameters_are_400_not_engine_failures(tiny, name):
    r = tiny.post(BAD_PARAMETERS[name].encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx2.get(tiny.url + "/health", timeout=5).json()["local"]["consecutive_failures"] == 0


def test_d2_cross_site_requests_never_reach_the_model(tmp_path, router):  # noqa: F811
    engine = CountingEngine()
    running = start_server(engine, make_config(tmp_path, router))
    try:
        evil = {"Origin": "http://evil.example"}
        simple = httpx2.post(running.url + "/v1/chat/completions", content=json.dumps(HI),
                             headers={"content-type": "text/plain", **evil}, timeout=5)
        form = httpx2.post(running.url + "/v1/chat/completions", content=b"a=b",
                           headers={"content-type": "application/x-www-form-urlencoded"}, timeout=5)
        rebind = httpx2.post(running.url + "/v1/chat/completions", json=HI,
                             headers={"Host": "attacker.example"}, timeout=5)
        assert (simple.status_code, form.status_code, rebind.status_code) == (403, 415, 403)
        assert simple.json()["error"]["code"] == "origin_not_allowed"
        assert httpx2.get(running.url + "/health", headers={"Host": "attacker.example:80"}).status_code == 403
        assert engine.streams == 0 and not router.chat_requests()
        own = running.url  # the server's own page: same origin
        assert running.post(HI, headers={"Origin": own}).status_code == 200
        assert running.post(HI, headers={"Host": "localhost"}).status_code == 200
    finally:
        running.stop()


def test_d2_allowed_origins_get_cors(tmp_path):
    settings = ServerSettings(default_max_tokens=8, access=AccessRules(allow_origins=("http://localhost:3000",),
                                                                        allow_hosts=("my-box.local",)))
    running = start_server(CountingEngine(), make_config(tmp_path), settings=settings)
    try:
        origin = {"Origin": "http://localhost:3000"}
        pre = httpx2.options(running.url + "/v1/chat/completions", headers={
            **origin, "Access-Control-Request-Method": "POST"}, timeout=5)
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == origin["Origin"]
        r = running.post(HI, headers=origin)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin["Origin"]
        assert running.post(HI, headers={"Host": "my-box.local:8000"}).status_code == 200
        assert running.post(HI, headers={"Origin": "http://localhost:4000"}).status_code == 403
    finally:
        running.stop()


def _half_open(url: str, n: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    held = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        held.append(s)
    return held


def test_d3_slowloris_cannot_starve_health_or_requests(tiny):
    held = _half_open(tiny.url, 100)
    try:
        started = time.monotonic()
        assert httpx2.get(tiny.url + "/health", timeout=2).status_code == 200
        answer = tiny.post(HI, timeout=2)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 4
        assert time.monotonic() - started < 2.0
        time.sleep(1.3)  # past the 1 s header deadline: the server has closed them, with a 408
        for s in held:
            s.settimeout(2)
            data = s.recv(100)
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
    finally:
        for s in held:
            s.close()


def test_d3_over_the_connection_budget_the_half_open_ones_make_room(tmp_path):
    settings = ServerSettings(default_max_tokens=8, connections=ConnectionLimits(max_connections=16))
    running = start_server(CountingEngine(), make_config(tmp_path), settings=settings)
    held = _half_open(running.url, 40)
    try:
        assert httpx2.get(running.url + "/health", timeout=2).status_code == 200
        assert running.post(HI, timeout=2).status_code == 200
    finally:
        for s in held:
            s.close()
        running.stop()


def test_d3_a_body_that_trickles_is_cut_at_its_deadline(tmp_path):
    settings = ServerSettings(connections=ConnectionLimits(body_timeout_s=0.5))
    running = start_server(CountingEngine(), make_config(tmp_path), settings=settings)
    try:
        host, port = running.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                      b"content-length: 1000\r\n\r\n{")
            started = time.monotonic()
            while s.recv(4096):
                pass
            assert time.monotonic() - started < 3
    finally:
        running.stop()


def test_d12_deep_json_is_a_400(tiny):
    r = tiny.post(b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_deep"


@pytest.mark.parametrize("flag", ["--max-body-mb", "--remote-image-timeout", "--header-timeout"])
def test_d13_nan_serve_flags_are_one_line_errors(tiny_int4_bundle, capsys, flag):
    from smoledge.cli import main

    assert main(["serve", str(tiny_int4_bundle), flag, "nan"]) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_d14_shutdown_ends_open_streams_with_the_error_event_and_health_says_503(tmp_path):
    engine = CountingEngine(" ".join(["word"] * 400), delay_s=0.02)
    running = start_server(engine, make_config(tmp_path), settings=ServerSettings(shutdown_grace_s=0.6))
    events, health = [], []

    def stream():
        with httpx2.stream("POST", running.url + "/v1/chat/completions", json={**HI, "stream": True,
                           "max_tokens": 400}, timeout=10) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    time.sleep(0.3)
    running.server.should_exit = True
    time.sleep(0.2)
    health.append(httpx2.get(running.url + "/health", timeout=2).status_code)
    reader.join(10)
    running.thread.join(10)
    assert health == [503]
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "cancelled", events[-3:]


def test_d10_upstream_error_text_never_carries_the_token(tmp_path, router):  # noqa: F811
    router.push(*[Reply("echo_auth")] * 3)
    engine = CountingEngine()
    config = make_config(tmp_path, router, models=("acme/vlm-large",), attempts=1)
    running = start_server(engine, config)
    try:
        big = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": data_url(png_bytes())}}] * 8 + [{"type": "text", "text": "hi"}]}], "max_tokens": 4}
        answer = running.post(big)
        assert router.chat_requests(), "the request did not reach the (echoing) router"
        assert answer.status_code == 502, answer.text
        assert TOKEN not in answer.text and "***" in answer.text
    finally:
        running.stop()


def test_serve_decodes_each_image_once(tiny, monkeypatch):
    from PIL import ImageFile

    decoded = []
    load = ImageFile.ImageFile.load

    def counting_load(self):
        if getattr(self, "_im", None) is None:  # pixels not decoded yet: this call decodes them
            decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}, {"type": "text", "text": "what?"}]}],
        "max_tokens": 2}
    r = tiny.post(body)
    assert r.status_code == 200, r.text
    assert len(decoded) == 1, decoded
