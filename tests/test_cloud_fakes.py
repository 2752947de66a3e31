"""Test doubles for the cloud fallback tests: a real HTTP router on 127.0.0.1 and a small local engine.

``FakeRouter`` speaks the router's OpenAI-compatible API (``POST /v1/chat/completions`` with SSE
streaming, ``GET /v1/models`` with pricing and context windows) over real sockets, and misbehaves on
demand: queue a :class:`Reply` per coming chat request (``router.push(Reply("429", retry_after="1"))``).
Requests it received are kept in ``router.requests``.  ``CannedEngine`` is a real ``LocalEngine``: it
streams a canned answer word by word, or raises / stalls where told.

The suite sets ``HF_HUB_OFFLINE=1`` for every test (conftest); the ``router`` fixtures clear it for the
test that uses them, since their traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from smoledge.cloud_fallback import (
    CloudConfig,
    CooldownConfig,
    LedgerConfig,
    PolicyConfig,
    RetryConfig,
    RouterConfig,
    load_profile,
)
from manifest_examples import example_manifest
from smoledge.cloud_fallback.engine import LocalEngine
from smoledge.runtime.manifest import Cloud, Manifest, Memory
from smoledge.runtime.preprocess import ImageProcessorConfig
from smoledge.runtime.types import ChatRequest, Message, RequestShape, SamplingConfig, StreamChunk

TOKEN = "hf_SECRETtesttoken0123456789"
ALL_ROUTERS: list = []
CLOUD_TEXT = "A lighthouse on a rocky coast at dusk."
LOCAL_TEXT = "a small red boat"
PROMPT = "Describe the harbour photo in detail please"

MANIFEST = example_manifest(
    context_length=8192,
    memory=Memory(weight_bytes=300_000_000, kv_bytes_per_token=50_000, vision_bytes_per_tile=40_000_000,
                  activation_bytes=0, notes=""),
    model_id="HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    image=ImageProcessorConfig(tile_size=512, longest_edge=2048, do_image_splitting=True, image_seq_len=64),
    cloud=Cloud("acme/vlm-large:fastest", ("acme/vlm-small:fake-provider",)),
)
MODELS_LISTING = {
    "object": "list",
    "data": [
        {"id": "acme/vlm-large", "providers": [
            {"provider": "fake-provider", "status": "live", "context_length": 131072,
             "pricing": {"input": 0.5, "output": 1.5}}]},
        {"id": "acme/vlm-small", "providers": [
            {"provider": "fake-provider", "status": "live", "context_length": 8192,
             "pricing": {"input": 0.1, "output": 0.2}}]},
    ],
}


@dataclass
class Reply:
    """How the fake router answers one chat request.

    kind: ok | json | 400 | 401 | 402 | 403 | 404 | 413 | 422 | 429 | 500 | 503 (an error status) | slow |
    drop | drop_early | malformed | malformed_body | stream_error (an error event with ``error_type``,
    before any text) | done_only (``data: [DONE]`` alone) | noisy (SSE comments, ``event:`` lines, CRLF,
    a split ``data:`` event) | no_usage | trickle (200, then only keep-alive comments and empty deltas,
    one every ``delay_s``, for ``hold_s``; then ``then_silent_s`` of silence) | silent (reads the request,
    then says nothing for ``hold_s``) | gzip_garbage (a body that does not decompress) | redirect (302) |
    slow_words (the answer, one word every ``delay_s``) | echo_auth (400 whose message repeats the
    Authorization header)
    """

    kind: str = "ok"
    text: str = CLOUD_TEXT
    retry_after: str | None = None
    delay_s: float = 0.0
    provider: str = "fake-provider"
    model: str | None = None  # only for requests to this model (None: any)
    error_type: str = "validation"  # for stream_error
    finish: str = "stop"  # the finish_reason of the last event
    hold_s: float = 4.0  # how long silent / trickle keep the connection
    then_silent_s: float = 0.0  # trickle: then say nothing for this long before ending


@dataclass
class Received:
    path: str
    headers: dict
    body: dict | None = None


@dataclass
class FakeRouter:
    server: ThreadingHTTPServer
    queue: list = field(default_factory=list)
    requests: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        ALL_ROUTERS.append(self)  # conftest checks every recorded body for the test token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def push(self, *replies: Reply) -> None:
        with self.lock:
            self.queue.extend(replies)

    def next_reply(self, model: str) -> Reply:
        with self.lock:
            for i, reply in enumerate(self.queue):
                if reply.model in (None, model):
                    return self.queue.pop(i)
        return Reply()

    def chat_requests(self) -> list[Received]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    router: FakeRouter

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.router.requests.append(Received(self.path, dict(self.headers)))
        if self.path == "/v1/models":
            self._send_json(200, MODELS_LISTING)
        else:
            self._send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.router.requests.append(Received(self.path, dict(self.headers), body))
        if self.path != "/v1/chat/completions":
            return self._send_json(404, {"error": "not found"})
        reply = self.router.next_reply(body.get("model", "").split(":")[0])
        if reply.kind == "slow":
            time.sleep(reply.delay_s or 1.0)
        try:
            getattr(self, f"_reply_{reply.kind}", self._reply_status)(reply, body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (deadline tests): fine
            self.close_connection = True

    # --- replies -------------------------------------------------------------------------------
    def _reply_status(self, reply: Reply, body: dict) -> None:
        code = int(reply.kind)
        messages = {400: f"Model {body.get('model')} is not supported by any provider you have enabled.",
                    401: "Invalid credentials in Authorization header", 402: "You have exceeded your monthly credits",
                    403: "This token has no permission to call Inference Providers", 404: "Model not found",
                    413: "Payload too large", 422: "Input validation error: max_tokens must be <= 4096",
                    429: "Too many requests", 500: "Internal error", 503: "Service unavailable"}
        headers = {"Retry-After": reply.retry_after} if reply.retry_after is not None else {}
        self._send_json(code, {"error": {"message": messages.get(code, "error")}}, headers)

    def _reply_echo_auth(self, reply: Reply, body: dict) -> None:  # a router that echoes the credentials
        self._send_json(400, {"error": {"message": f"bad request from {self.headers.get('Authorization')}"}})

    def _reply_ok(self, reply: Reply, body: dict) -> None:
        self._start_stream(reply)
        for event in _events(reply.text, body.get("model", ""), reply.finish):
            self._chunk(f"data: {json.dumps(event)}\n\n")
        self._chunk("data: [DONE]\n\n")
        self._chunk("")

    _reply_slow = _reply_ok

    def _reply_slow_words(self, reply: Reply, body: dict) -> None:
        """A healthy but slow stream: one word every ``delay_s``."""
        self._start_stream(reply)
        for event in _events(reply.text, body.get("model", ""), reply.finish):
            self._chunk(f"data: {json.dumps(event)}\n\n")
            time.sleep(reply.delay_s)
        self._chunk("data: [DONE]\n\n")
        self._chunk("")

    def _reply_no_usage(self, reply: Reply, body: dict) -> None:
        self._start_stream(reply)
        for event in _events(reply.text, body.get("model", ""), reply.finish)[:-1]:
            self._chunk(f"data: {json.dumps(event)}\n\n")
        self._chunk("data: [DONE]\n\n")
        self._chunk("")

    def _reply_noisy(self, reply: Reply, body: dict) -> None:
        """The same answer in SSE's other legal forms: CRLF, comments, event/id/retry fields, split data lines."""
        self._start_stream(reply)
        self._chunk(": keep-alive\r\n\r\nretry: 1000\r\n\r\n")
        for i, event in enumerate(_events(reply.text, body.get("model", ""), reply.finish)):
            text = json.dumps(event)
            if i == 1:  # one event split over two data: lines (joined with a newline, still valid JSON)
                half = text.index(",") + 1
                self._chunk(f"event: message\r\nid: {i}\r\ndata: {text[:half]}\r\ndata:{text[half:]}\r\n\r\n")
            else:
                self._chunk(f"event: message\r\ndata: {text}\r\n\r\n: ping\r\n\r\n")
        self._chunk("data: [DONE]\r\n\r\n")
        self._chunk("")

    def _reply_done_only(self, reply: Reply, body: dict) -> None:
        self._start_stream(reply)
        self._chunk("data: [DONE]\n\n")
        self._chunk("")

    def _reply_stream_error(self, reply: Reply, body: dict) -> None:
        """TGI's form: a 200 stream whose first event is an error with ``error_type`` (and the usage so far)."""
        self._start_stream(reply)
        event = {"error": "Input validation error" if reply.error_type == "validation" else "model overloaded",
                 "error_type": reply.error_type, "usage": {"prompt_tokens": 1200, "completion_tokens": 0}}
        self._chunk(f"event: error\ndata: {json.dumps(event)}\n\n")
        self._chunk("")

    def _reply_trickle(self, reply: Reply, body: dict) -> None:
        self._start_stream(reply)
        empty = {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        end = time.monotonic() + reply.hold_s
        while time.monotonic() < end:
            self._chunk(": keep-alive\n\n" if int(time.monotonic() * 10) % 2 else f"data: {json.dumps(empty)}\n\n")
            time.sleep(reply.delay_s or 0.1)
        time.sleep(reply.then_silent_s)
        self._chunk("")

    def _reply_silent(self, reply: Reply, body: dict) -> None:
        time.sleep(reply.hold_s)
        self.close_connection = True

    def _reply_gzip_garbage(self, reply: Reply, body: dict) -> None:
        raw = b"this is not gzip at all"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _reply_redirect(self, reply: Reply, body: dict) -> None:
        self.send_response(302)
        self.send_header("Location", "http://127.0.0.1:9/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _reply_json(self, reply: Reply, body: dict) -> None:
        self._send_json(200, {"id": "x", "model": body.get("model"), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 9, "total_tokens": 109}},
            {"x-inference-provider": reply.provider})

    def _reply_drop(self, reply: Reply, body: dict) -> None:
        self._start_stream(reply)
        for event in _events(reply.text, body.get("model", ""))[:3]:
            self._chunk(f"data: {json.dumps(event)}\n\n")
        self._kill_connection()

    def _reply_drop_early(self, reply: Reply, body: dict) -> None:
        self._start_stream(reply)
        self._kill_connection()

    def _reply_malformed(self, reply: Reply, body: dict) -> None:
        self._start_stream(reply)
        self._chunk('data: {"choices": [{"delta": {"content": "Hel\n\n')
        self._chunk("data: [DONE]\n\n")
        self._chunk("")

    def _reply_malformed_body(self, reply: Reply, body: dict) -> None:
        raw = b'{"choices": [ this is not json'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    # --- wire helpers --------------------------------------------------------------------------
    def _start_stream(self, reply: Reply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-inference-provider", reply.provider)
        self.end_headers()

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _kill_connection(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _send_json(self, code: int, payload: dict, headers: dict | None = None) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(raw)


def _events(text: str, model: str, finish: str = "stop") -> list[dict]:
    words = text.split(" ")
    events = [{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": w if i == 0 else " " + w},
                            "finish_reason": None}]} for i, w in enumerate(words)]
    events.append({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    events.append({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [],
                   "usage": {"prompt_tokens": 1200, "completion_tokens": len(words),
                             "total_tokens": 1200 + len(words)}})
    return events


@pytest.fixture
def online(monkeypatch):
    """HF_HUB_OFFLINE cleared for one test whose cloud traffic goes to 127.0.0.1 only."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def router(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # this test's cloud is on 127.0.0.1
    handler = type("Handler", (_Handler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.block_on_close = False
    fake = FakeRouter(server)
    handler.router = fake
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


# --- a real LocalEngine ------------------------------------------------------------------------

class CannedEngine:
    """Streams ``text`` word by word; ``fail`` is raised before word ``fail_at``; ``delay_s`` before each word."""

    def __init__(self, text: str = LOCAL_TEXT, *, tiles_per_image: int = 2, fail: BaseException | None = None,
                 fail_at: int = 0, delay_s: float = 0.0, first_delay_s: float = 0.0, manifest: Manifest | None = None,
                 measure_error: BaseException | None = None, frames: int = 0):
        self.text, self.tiles_per_image, self.frames = text, tiles_per_image, frames
        self.fail, self.fail_at, self.delay_s, self.first_delay_s = fail, fail_at, delay_s, first_delay_s
        self.measure_error = measure_error
        self._manifest = manifest or MANIFEST
        self.streams = 0

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    def measure(self, request: ChatRequest) -> RequestShape:
        if self.measure_error is not None:
            raise self.measure_error
        images = len(request.images())
        tiles = images * self.tiles_per_image
        words = sum(len(p.text.split()) for m in request.messages for p in m.content if hasattr(p, "text"))
        return RequestShape(prompt_tokens=words + 64 * tiles, max_new_tokens=request.sampling.max_new_tokens,
                            image_tiles=tiles, images=images, video_frames=self.frames)

    def stream(self, request: ChatRequest):
        self.streams += 1
        words = self.text.split(" ")
        for i, word in enumerate(words):
            if self.fail is not None and i == self.fail_at:
                raise self.fail
            time.sleep(self.first_delay_s if i == 0 else self.delay_s)
            yield StreamChunk(text=word if i == 0 else " " + word, token_id=i,
                              finish_reason="stop" if i == len(words) - 1 else None)


def make_config(tmp_path: Path, router: FakeRouter | None = None, *, profile: str = "raspberry-pi-5-4gb",
                policy: PolicyConfig | None = None, models: tuple[str, ...] = (), token: str | None = TOKEN,
                attempts: int = 3, project: str = "test", read_timeout_s: float = 0.5,
                base_url: str | None = None, budget_s: float = 20.0, ledger: LedgerConfig | None = None,
                cooldown_failures: int = 1) -> RouterConfig:
    cloud = CloudConfig(
        base_url=base_url or (router.url if router else "http://127.0.0.1:9/v1"),
        models=models, token=token, bill_to="acme-org",
        connect_timeout_s=0.5, read_timeout_s=read_timeout_s, total_timeout_s=5.0, pricing_timeout_s=1.0,
        budget_s=budget_s,
        retry=RetryConfig(attempts=attempts, base_delay_s=0.001, max_delay_s=0.005, max_retry_after_s=2.0),
        cooldown=CooldownConfig(failures=cooldown_failures, seconds=30.0),
    )
    ledger = ledger or LedgerConfig(path=tmp_path / "ledger.sqlite", project=project, lock_timeout_s=0.2)
    return RouterConfig(profile=load_profile(profile), policy=policy or PolicyConfig(), cloud=cloud,
                        ledger=ledger, cache_dir=tmp_path)


def _small_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 40, 40)).save(buf, format="JPEG")
    return buf.getvalue()


SMALL_JPEG = _small_jpeg()


def request_with_images(n_images: int = 1, text: str = PROMPT, max_new_tokens: int = 32) -> ChatRequest:
    return ChatRequest((Message.user(text, [SMALL_JPEG] * n_images),), SamplingConfig(max_new_tokens=max_new_tokens))


def test_fake_engine_is_a_local_engine():
    assert isinstance(CannedEngine(), LocalEngine)
