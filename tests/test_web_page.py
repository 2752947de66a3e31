"""The chat page of ``smoledge serve`` in headless Chromium (Debian's ``chromium``, driven by playwright-core
from runtime/js/node_modules through tests/web_page_driver.mjs), and the server's access log.

The server runs the real-text bundle on 127.0.0.1 with an API key; the page answers the Paris question with
greedy decoding, then a turn with an uploaded image; nothing leaves the server's origin.  The screenshot is
kept in tests/out/web_page/.  Outside CI a missing Chromium or playwright-core skips; with CI=true it fails.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import PARIS_QUESTION, REPO, synthetic_image

KEY = "sk-web-page-test-key-31337"
MODEL = "realtext-web"
CHROMIUM = os.environ.get("SMOLEDGE_CHROMIUM", "/usr/bin/chromium")
PLAYWRIGHT = REPO / "runtime" / "js" / "node_modules" / "playwright-core"
KEPT = REPO / "tests" / "out" / "web_page"


class Server:
    """``smoledge serve`` in a subprocess on an ephemeral port; its stderr lines collected as they come."""

    def __init__(self, bundle: Path, *flags: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "smoledge.cli", "serve", str(bundle), "--port", "0",
                                      "--model-name", MODEL, "--shutdown-grace", "1", *flags],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(180) or self.url is None:
            self.stop()
            pytest.fail(f"the server did not start: {self.lines}")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(60)
        time.sleep(0.2)  # the reader thread takes the last lines
        return rc

    def access_lines(self) -> list[str]:
        return [line for line in self.lines if re.match(r"smoledge serve: (GET|POST|OPTIONS|HEAD|PUT) ", line)]


def _browser_missing() -> str | None:
    missing = [str(p) for p in (Path(CHROMIUM), PLAYWRIGHT) if not p.exists()] + ([] if shutil.which("node") else ["node"])
    if not missing:
        return None
    reason = f"missing {', '.join(missing)} (apt-get install -y chromium; npm ci in runtime/js)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    return reason


@pytest.fixture(scope="module")
def served(realtext_int4_bundle):
    server = Server(realtext_int4_bundle, "--api-key", KEY)
    yield server
    server.stop()


def test_the_chat_page_answers_paris_in_headless_chromium(served, tmp_path):
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    image = tmp_path / "picture.png"
    synthetic_image(96, 80).save(image)
    spec = {"model": MODEL, "api_key": KEY, "temperature": 0, "max_tokens": 12,
            "turns": [{"text": PARIS_QUESTION}, {"text": "Describe the picture in one sentence.", "image": str(image)}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    shot = tmp_path / "chat-page.png"
    proc = subprocess.run(["node", str(REPO / "tests" / "web_page_driver.mjs"), f"{served.url}/", str(shot),
                           str(tmp_path / "spec.json")], capture_output=True, text=True, timeout=420, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    KEPT.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, KEPT / "chat-page.png")
    assert "Paris" in result["answers"][0], result
    assert result["answers"][1].strip() and not result["answers"][1].startswith("error"), result
    assert all(route and route.startswith("route: local") for route in result["routes"]), result
    assert re.search(r"\d+ prompt \+ \d+ answer tokens, [\d.]+ s, local", result["status"]), result
    unexpected = [p for p in result["problems"] if "status of 401" not in p]  # the first /v1/models, keyless
    assert result["model"] == MODEL and result["outside"] == [] and unexpected == [], result
    assert shot.stat().st_size > 10_000

    # the access log: one line per request, the route's figures, never the key or the image
    time.sleep(0.3)
    lines = served.access_lines()
    for path in ("/", "/chat.js", "/chat.css", "/v1/models"):
        assert any(re.fullmatch(rf"smoledge serve: GET {re.escape(path)} 200 \d+\.\d\d s", x) for x in lines), lines
    posts = [x for x in lines if x.startswith("smoledge serve: POST /v1/chat/completions")]
    assert len(posts) == 2 and all(re.fullmatch(r"smoledge serve: POST /v1/chat/completions 200 local \d+\+\d+ "
                                                r"tokens \d+\.\d\d s", x) for x in posts), posts
    picture = base64.b64encode(image.read_bytes()).decode()
    log = "\n".join(served.lines)
    assert KEY not in log and picture[:40] not in log and picture[-40:] not in log


def _get(url: str, headers: dict | None = None):
    """(status, headers (case-insensitive), body)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_the_page_is_served_with_a_strict_policy_and_refused_to_foreign_origins(served):
    status, headers, body = _get(f"{served.url}/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'src="/chat.js"' in body
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert b"http://" not in body and b"https://" not in body  # no CDN: everything from this server
    for name in ("chat.js", "chat.css"):
        status, headers, body = _get(f"{served.url}/{name}")
        assert status == 200 and b"http://" not in body and b"https://" not in body
    # the page's own origin may call /v1; another page may not
    port = served.url.rsplit(":", 1)[1]
    assert _get(f"{served.url}/v1/models", {"Origin": served.url, "Authorization": f"Bearer {KEY}"})[0] == 200
    assert _get(f"{served.url}/v1/models", {"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"})[0] == 403
    assert _get(f"{served.url}/v1/models", {"Origin": f"http://localhost:{port}"})[0] == 403  # other origin
    assert _get(f"{served.url}/v1/models")[0] == 401
    time.sleep(0.3)
    lines = served.access_lines()
    assert "smoledge serve: GET /v1/models 403" in "\n".join(lines) and any(" 401 " in x for x in lines)
