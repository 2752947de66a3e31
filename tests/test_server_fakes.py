"""Test doubles for the server tests: `smoledge serve`'s app on 127.0.0.1 in a thread, a counting engine.

``start_server(engine, config, ...)`` binds an ephemeral loopback port, runs the real app (uvicorn +
Starlette) in a thread and returns a :class:`Running` with the URL and an ``openai`` client factory;
``Running.stop()`` shuts it down as SIGTERM would.  ``CountingEngine`` is the cloud tests'
``CannedEngine`` that also counts the chunks it produced and the streams still open, so a test can see
that a cancelled generation stopped.  All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import httpx2
import pytest
from openai import OpenAI
from test_cloud_fakes import CannedEngine, FakeRouter, _Handler

from smoledge.cloud_fallback import RouterConfig
from smoledge.serve import bind
from smoledge.server_app import ServerSettings, SmolServer, make_server, run_server
from smoledge.server_worker import Service


@dataclass
class Running:
    url: str
    service: Service
    server: SmolServer
    thread: threading.Thread

    def client(self, api_key: str = "unused", timeout: float = 30.0) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def post(self, body: bytes | dict, headers: dict | None = None, path: str = "/v1/chat/completions",
             timeout: float = 30.0) -> httpx2.Response:
        if isinstance(body, dict):
            return httpx2.post(self.url + path, json=body, headers=headers, timeout=timeout)
        headers = {"content-type": "application/json", **(headers or {})}  # the server requires JSON on /v1/*
        return httpx2.post(self.url + path, content=body, headers=headers, timeout=timeout)

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not shut down"


def start_server(engine, config: RouterConfig, *, settings: ServerSettings | None = None, queue_size: int = 8,
                 model_id: str = "smoledge-test", fetcher=None) -> Running:
    sock = bind("127.0.0.1", 0)
    service = Service(engine, config, queue_size=queue_size, model_id=model_id)
    server = make_server(service, settings or ServerSettings(default_max_tokens=32), fetcher=fetcher)
    thread = threading.Thread(target=run_server, args=(server, sock), name="smoledge-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    host, port = sock.getsockname()[:2]
    return Running(f"http://{host}:{port}", service, server, thread)


@pytest.fixture(scope="module")
def module_router():
    """The cloud tests' fake HF router, on 127.0.0.1, shared by a module's tests (HF_HUB_OFFLINE cleared)."""
    patch = pytest.MonkeyPatch()
    patch.delenv("HF_HUB_OFFLINE", raising=False)
    handler = type("Handler", (_Handler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    fake = FakeRouter(server)
    handler.router = fake
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    patch.undo()


class CountingEngine(CannedEngine):
    """A ``CannedEngine`` that counts the chunks it produced and the streams still open."""

    def __init__(self, text: str = "one two three", **kwargs):
        super().__init__(text, **kwargs)
        self.produced = 0
        self.open = 0
        self.peak_open = 0
        self._lock = threading.Lock()

    def stream(self, request):
        with self._lock:
            self.open += 1
            self.peak_open = max(self.peak_open, self.open)
        try:
            for piece in super().stream(request):
                with self._lock:
                    self.produced += 1
                yield piece
        finally:
            with self._lock:
                self.open -= 1


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def png_bytes(width: int = 64, height: int = 48, seed: int = 0, fmt: str = "PNG") -> bytes:
    from conftest import synthetic_image

    buf = io.BytesIO()
    synthetic_image(width, height, seed).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_message(url: str, text: str = "What is in this image?") -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_start_and_stop_a_server_in_a_thread(tmp_path):
    from test_cloud_fakes import make_config

    running = start_server(CountingEngine(), make_config(tmp_path))
    assert httpx2.get(running.url + "/health", timeout=5).json()["status"] == "ok"
    running.stop()
    assert running.service.draining
