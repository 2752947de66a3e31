"""`smoledge serve` as a user runs it, on the real-text bundle: "Paris" through the API, a bounded load
test, and SIGTERM.

The server is a subprocess (``python -m smoledge.cli serve BUNDLE --port 0``) on 127.0.0.1, so its
memory is its own: RSS is read before and after the load.  The load: ``CLIENTS`` concurrent
``openai`` clients for ``SECONDS`` s, half of them streaming; every request must end in a full answer
or a clean 429 with Retry-After, never anything else.  The figures are printed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx2
import openai
import psutil
import pytest
from conftest import PARIS_QUESTION, REPO
from test_cloud_fakes import TOKEN
from test_server_fakes import module_router  # noqa: F401

pytestmark = pytest.mark.slow

QUESTION = PARIS_QUESTION
CLIENTS = int(os.environ.get("SMOLEDGE_LOAD_CLIENTS", "24"))
SECONDS = float(os.environ.get("SMOLEDGE_LOAD_SECONDS", "20"))
QUEUE = 8


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    log: list = field(default_factory=list)

    def client(self, timeout: float = 120.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=timeout)

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def threads(self) -> int:
        return psutil.Process(self.proc.pid).num_threads()


def _drain(stream, log: list, ready: threading.Event) -> None:
    for line in stream:
        log.append(line.rstrip("\n"))
        if " on http://" in line:
            ready.set()


@pytest.fixture(scope="module")
def served(realtext_int4_bundle, module_router, tmp_path_factory):  # noqa: F811
    env = {**os.environ, "SMOLEDGE_CACHE_DIR": str(tmp_path_factory.mktemp("serve-cache")),
           "SMOLEDGE_CLOUD_BASE_URL": module_router.url, "HF_TOKEN": TOKEN, "SMOLEDGE_PROFILE": "auto"}
    env.pop("SMOLEDGE_NO_CLOUD", None)
    proc = subprocess.Popen([sys.executable, "-m", "smoledge.cli", "serve", str(realtext_int4_bundle), "--port", "0",
                             "--queue-size", str(QUEUE), "--shutdown-grace", "10", "--threads", "2"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    log, ready = [], threading.Event()
    threading.Thread(target=_drain, args=(proc.stderr, log, ready), daemon=True).start()
    if not ready.wait(180):
        proc.kill()
        pytest.fail(f"the server did not start: {log}")
    url = next(line for line in log if " on http://" in line).split(" on ", 1)[1].split("/v1")[0]
    yield Served(proc, url, log)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def test_paris_comes_out_through_the_api(served, module_router):  # noqa: F811
    client = served.client()
    raw = client.chat.completions.with_raw_response.create(
        model="any", messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0)
    reply = raw.parse()
    assert "Paris" in reply.choices[0].message.content, reply.choices[0].message.content
    assert raw.headers["x-smoledge-route"] == "local" and reply.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": QUESTION}], max_tokens=24, stream=True, temperature=0))
    assert streamed == reply.choices[0].message.content
    assert module_router.chat_requests() == []  # nothing went to the (fake) cloud


@dataclass
class Tally:
    ok: int = 0
    busy: int = 0
    failures: list = field(default_factory=list)
    latencies: list = field(default_factory=list)
    retry_after: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _one(client: openai.OpenAI, stream: bool) -> tuple[str, str | None]:
    ask = dict(model="any", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0)
    if not stream:
        reply = client.chat.completions.create(**ask)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    text, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **ask):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def _client_loop(served: Served, index: int, deadline: float, tally: Tally) -> None:
    client = served.client()
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            text, finish = _one(client, stream=index % 2 == 1)
        except openai.RateLimitError as err:
            wait = float(err.response.headers["retry-after"])
            with tally.lock:
                tally.busy += 1
                tally.retry_after.append(wait)
            time.sleep(min(wait, 1.0))
            continue
        except Exception as err:  # anything but an answer or a 429 fails the test
            with tally.lock:
                tally.failures.append(repr(err))
            continue
        with tally.lock:
            if finish in ("stop", "length") and "Paris" in text:
                tally.ok += 1
                tally.latencies.append(time.monotonic() - started)
            else:
                tally.failures.append(f"incomplete answer {text!r} (finish {finish})")


def _sample_rss(served: Served, stop: threading.Event, peaks: list) -> None:
    while not stop.wait(0.25):
        peaks.append(served.rss_mb())


def test_bounded_load_gives_full_answers_or_clean_429s_and_memory_stays_flat(served, capsys):
    for _ in range(3):  # warm up: the first answers grow onnxruntime's arenas
        _one(served.client(), stream=False)
    rss_before, threads_before = served.rss_mb(), served.threads()
    tally, peaks, stop = Tally(), [], threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(served, stop, peaks), daemon=True)
    sampler.start()
    started = time.monotonic()
    deadline = started + SECONDS
    clients = [threading.Thread(target=_client_loop, args=(served, i, deadline, tally), daemon=True)
               for i in range(CLIENTS)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(SECONDS + 120)
    elapsed = time.monotonic() - started
    stop.set()
    time.sleep(1.0)
    rss_after = served.rss_mb()
    health = httpx2.get(served.url + "/health", timeout=10).json()
    lat = sorted(tally.latencies) or [0.0]
    with capsys.disabled():
        print(f"\n[serve load] {CLIENTS} clients x {elapsed:.1f} s on the real-text bundle (queue {QUEUE}): "
              f"{tally.ok} full answers ({tally.ok / elapsed:.2f}/s), {tally.busy} clean 429s "
              f"(Retry-After {min(tally.retry_after, default=0):g}-{max(tally.retry_after, default=0):g} s), "
              f"{len(tally.failures)} failures; latency p50 {statistics.median(lat):.2f} s, "
              f"p95 {lat[int(0.95 * (len(lat) - 1))]:.2f} s, max {lat[-1]:.2f} s; server RSS "
              f"{rss_before:.0f} MiB before, {max(peaks, default=rss_after):.0f} MiB peak, {rss_after:.0f} MiB after; "
              f"threads {threads_before} before, {served.threads()} after")
    assert not tally.failures, tally.failures[:5]
    assert served.proc.poll() is None, "the server died"
    assert tally.ok >= CLIENTS // 4 and tally.busy > 0  # it served, and it pushed back
    assert health["in_flight"] == 0 and health["waiting_for_model"] == 0
    assert rss_after < rss_before + 150, "memory grew under load"
    assert max(peaks, default=0) < rss_before + 400


def test_sigterm_lets_the_answer_in_flight_finish(served):
    text, finish = [], []
    worker_error = []

    def read() -> None:
        try:
            for chunk in served.client().chat.completions.create(
                    model="any", messages=[{"role": "user", "content": QUESTION}], max_tokens=48, stream=True,
                    temperature=0):
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish.append(chunk.choices[0].finish_reason)
        except Exception as err:  # noqa: BLE001 - reported below
            worker_error.append(err)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while not "".join(text) and time.monotonic() < deadline:
        time.sleep(0.01)
    served.proc.terminate()
    worker.join(30)
    assert not worker_error and "Paris" in "".join(text) and finish[-1] in ("stop", "length")
    assert served.proc.wait(30) in (0, -15)
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(served.url + "/health", timeout=2)
