"""Bad requests to `smoledge serve`: each is a 4xx with an OpenAI error body, none reaches the model.

The server here runs a counting fake engine (validation does not depend on the model) with an API key
and small limits; remote image URLs are fetched only from a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import openai
import pytest
from test_cloud_fakes import make_config
from test_server_fakes import CountingEngine, data_url, image_message, png_bytes, start_server

from smoledge.server_app import ServerSettings
from smoledge.runtime.server_images import ImageLimits

KEY = "sk-local-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ImageLimits(max_image_bytes=64 * 1024, max_image_pixels=1_000_000, max_images=2)


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    engine = CountingEngine()
    settings = ServerSettings(api_key=KEY, max_body_bytes=256 * 1024, images=LIMITS, default_max_tokens=16)
    running = start_server(engine, make_config(tmp_path_factory.mktemp("strict")), settings=settings)
    yield running, engine
    running.stop()


def _user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


def _image(url: str) -> dict:
    return {"messages": [image_message(url)]}


def _noise_png(side: int) -> bytes:
    return png_bytes(side, side, seed=1)


def _flat_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


BAD = {  # name: (body, status, code, param)
    "invalid json": (b'{"messages": [', 400, "invalid_json", None),
    "not an object": (b"[1, 2]", 400, "invalid_json", None),
    "not utf-8": (b"\xff\xfe{}", 400, "invalid_json", None),
    "messages missing": ({"model": "m"}, 400, "missing_required_parameter", "messages"),
    "messages a string": ({"messages": "hi"}, 400, "invalid_type", "messages"),
    "messages empty": ({"messages": []}, 400, "empty_array", "messages"),
    "message not an object": ({"messages": ["hi"]}, 400, "invalid_type", "messages[0]"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_role", "messages[0].role"),
    "tool role": ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "invalid_role", "messages[0].role"),
    "content a number": (_user(42), 400, "invalid_type", "messages[0].content"),
    "text not a string": (_user([{"type": "text", "text": 5}]), 400, "invalid_type", "messages[0].content[0].text"),
    "audio part": (_user([{"type": "input_audio", "input_audio": {}}]), 400, "unsupported_content",
                   "messages[0].content[0].type"),
    "max_tokens a string": ({**_user("hi"), "max_tokens": "10"}, 400, "invalid_type", "max_tokens"),
    "max_tokens zero": ({**_user("hi"), "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    "max_tokens a float": ({**_user("hi"), "max_completion_tokens": 1.5}, 400, "invalid_type",
                           "max_completion_tokens"),
    "temperature a string": ({**_user("hi"), "temperature": "hot"}, 400, "invalid_type", "temperature"),
    "temperature too high": ({**_user("hi"), "temperature": 7}, 400, "invalid_value", "temperature"),
    "top_p zero": ({**_user("hi"), "top_p": 0}, 400, "invalid_value", "top_p"),
    "stream a string": ({**_user("hi"), "stream": "yes"}, 400, "invalid_type", "stream"),
    "seed a string": ({**_user("hi"), "seed": "7"}, 400, "invalid_type", "seed"),
    "stop a number": ({**_user("hi"), "stop": 3}, 400, "invalid_type", "stop"),
    "five stops": ({**_user("hi"), "stop": list("abcde")}, 400, "invalid_value", "stop"),
    "n = 2": ({**_user("hi"), "n": 2}, 400, "invalid_value", "n"),
    "tools": ({**_user("hi"), "tools": [{"type": "function"}]}, 400, "unsupported_parameter", "tools"),
    "corrupt base64": (_image("data:image/png;base64,iVBOR*&^%$not-base64"), 400, "invalid_base64",
                       "messages[0].content[0].image_url.url"),
    "text data url": (_image("data:text/plain;base64," + base64.b64encode(b"hello").decode()), 400,
                      "invalid_image", "messages[0].content[0].image_url.url"),
    "text posing as png": (_image(data_url(b"this is not an image at all\n" * 4)), 400, "invalid_image",
                           "messages[0].content[0].image_url.url"),
    "truncated png": (_image(data_url(png_bytes(64, 64)[:200])), 400, "invalid_image",
                      "messages[0].content[0].image_url.url"),
    "data url not base64": (_image("data:image/png,rawbytes"), 400, "invalid_image_url",
                            "messages[0].content[0].image_url.url"),
    "image too many bytes": (_image(data_url(_noise_png(200))), 400, "image_too_large",
                             "messages[0].content[0].image_url.url"),
    "image too many pixels": (_image(data_url(_flat_png(1200, 1000))), 400, "image_too_large",
                              "messages[0].content[0].image_url.url"),
    "remote url": (_image("https://example.com/cat.png"), 400, "remote_image_not_allowed",
                   "messages[0].content[0].image_url.url"),
    "local path": (_image("/etc/passwd"), 400, "invalid_image_url", "messages[0].content[0].image_url.url"),
    "file url": (_image("file:///etc/passwd"), 400, "invalid_image_url", "messages[0].content[0].image_url.url"),
    "image in a system turn": ({"messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}]}, 400, "invalid_image_url",
        "messages[0].content[0]"),
    "three images": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}] * 3}]}, 400, "too_many_images",
        "messages[0].content[2]"),
}


def _check_error_body(response, status: int, code: str | None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    assert error["code"] == code and error["param"] == param
    return error


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_request_is_a_4xx_with_an_openai_error(strict, name):
    running, engine = strict
    body, status, code, param = BAD[name]
    before = engine.streams
    error = _check_error_body(running.post(body, headers=AUTH), status, code, param)
    assert error["type"] == "invalid_request_error"
    assert engine.streams == before  # nothing reached the model


def test_an_oversized_body_is_413(strict):
    running, _ = strict
    body = json.dumps(_user("x" * 300_000)).encode()
    _check_error_body(running.post(body, headers=AUTH), 413, "request_too_large")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_a_missing_or_wrong_api_key_is_401(strict, headers):
    running, engine = strict
    before = engine.streams
    for path in ("/v1/chat/completions", "/v1/models"):
        if path.endswith("completions"):
            response = running.post(_user("hi"), headers=headers)
        else:
            response = httpx2.get(running.url + path, headers=headers, timeout=10)
        error = _check_error_body(response, 401, "invalid_api_key")
        assert error["type"] == "authentication_error" and response.headers["www-authenticate"] == "Bearer"
    assert engine.streams == before


def test_the_openai_client_sees_typed_errors(strict):
    running, _ = strict
    with pytest.raises(openai.AuthenticationError):
        running.client(api_key="wrong").models.list()
    client = running.client(api_key=KEY)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.code == "invalid_role" and err.value.param == "messages[0].role"
    reply = client.chat.completions.create(model="m", messages=[{"role": "developer", "content": "Be brief."},
                                                                {"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "one two three"


def test_health_needs_no_key_and_unknown_routes_are_404(strict):
    running, _ = strict
    assert httpx2.get(running.url + "/health", timeout=5).status_code == 200
    _check_error_body(httpx2.get(running.url + "/v2/anything", timeout=5), 404, "not_found")
    _check_error_body(httpx2.get(running.url + "/v1/chat/completions", timeout=5), 405, "method_not_allowed")


# --------------------------------------------------------------------------------------------- remote images


class _ImageHost(BaseHTTPRequestHandler):
    """Serves /ok.png, /big.png, /slow.png and /moved on 127.0.0.1."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/slow.png":
            time.sleep(1.5)
        data = _noise_png(300) if self.path == "/big.png" else png_bytes(64, 48)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the server under test gave up on this image (too big / too slow)
            pass


@pytest.fixture(scope="module")
def image_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _remote_server(tmp_path, private: bool):
    limits = ImageLimits(max_image_bytes=64 * 1024, allow_remote=True, remote_timeout_s=0.5,
                         allow_private_hosts=private)
    return start_server(CountingEngine(), make_config(tmp_path), settings=ServerSettings(images=limits))


def test_remote_images_when_allowed_have_size_time_and_redirect_limits(tmp_path, image_host):
    running = _remote_server(tmp_path, private=True)
    try:
        assert running.post(_image(f"{image_host}/ok.png")).status_code == 200
        for path, code in (("/big.png", "image_too_large"), ("/slow.png", "image_fetch_timeout"),
                           ("/moved", "image_fetch_failed"), ("http://127.0.0.1:9/x.png", "image_fetch_failed")):
            url = path if path.startswith("http") else image_host + path
            _check_error_body(running.post(_image(url)), 400, code,
                              "messages[0].content[0].image_url.url")
    finally:
        running.stop()


def test_remote_images_from_private_addresses_are_refused_by_default(tmp_path, image_host):
    running = _remote_server(tmp_path, private=False)
    try:
        for url in (f"{image_host}/ok.png", "http://localhost:9/x.png", "http://169.254.169.254/latest/meta-data"):
            error = _check_error_body(running.post(_image(url)), 400, "remote_image_not_allowed",
                                      "messages[0].content[0].image_url.url")
            assert "non-public address" in error["message"]
    finally:
        running.stop()
