"""`smoledge serve` through the official `openai` client: answers, streams, images, models, routes.

The tiny bundle answers locally through the real runtime (and must say exactly what
``Pipeline.generate`` says for the same request); the cloud route goes to the fake HF router on
127.0.0.1.  The real-text "Paris" check lives in test_server_load.py.
"""

from __future__ import annotations

import httpx2
import openai
import pytest
from conftest import PARIS_QUESTION
from test_cloud_fakes import CLOUD_TEXT, LOCAL_TEXT, make_config, router  # noqa: F401
from test_server_fakes import (  # noqa: F401
    CountingEngine,
    data_url,
    image_message,
    module_router,
    png_bytes,
    start_server,
)

from smoledge.cloud_fallback import PolicyConfig
from smoledge.errors import BackendError
from smoledge.runtime.types import ChatRequest, ImagePart, Message, SamplingConfig, TextPart

QUESTION = PARIS_QUESTION


@pytest.fixture(scope="module")
def tiny_pipe(tiny_int4_bundle):
    from smoledge.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_int4_bundle)


@pytest.fixture(scope="module")
def tiny(tiny_pipe, module_router, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("serve"), module_router, profile="auto")
    running = start_server(tiny_pipe, config, model_id="smolvlm-tiny")
    yield running
    running.stop()


def _greedy(pipe, messages: tuple, max_new: int) -> str:
    return pipe.generate(ChatRequest(messages, SamplingConfig(max_new_tokens=max_new)))


def test_plain_answer_is_what_the_pipeline_says(tiny, tiny_pipe):
    raw = tiny.client().chat.completions.with_raw_response.create(
        model="smolvlm-tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=12)
    reply = raw.parse()
    assert raw.headers["x-smoledge-route"] == "local" and raw.headers["x-smoledge-route-code"] == "fits"
    assert reply.smoledge["route"] == "local" and reply.smoledge["reason"].startswith("fits ")
    assert reply.model == "smolvlm-tiny" and reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == _greedy(tiny_pipe, (Message.user(QUESTION),), 12)
    assert reply.choices[0].finish_reason in ("stop", "length")
    shape = tiny_pipe.measure(ChatRequest((Message.user(QUESTION),), SamplingConfig(max_new_tokens=12)))
    assert reply.usage.prompt_tokens == shape.prompt_tokens
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_answer_equals_the_plain_one(tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    client = tiny.client()
    plain = client.chat.completions.create(model="m", messages=messages, max_completion_tokens=10)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_completion_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].smoledge["route"] == "local"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_stream_without_usage_option_has_no_usage_chunk(tiny):
    chunks = list(tiny.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))
    assert all(c.choices for c in chunks) and chunks[-1].choices[0].finish_reason is not None


def test_image_question(tiny, tiny_pipe):
    image = png_bytes(300, 200, seed=3)
    reply = tiny.client().chat.completions.create(
        model="m", messages=[image_message(data_url(image))], max_tokens=8)
    request = ChatRequest((Message("user", (ImagePart(image), TextPart("What is in this image?"))),),
                          SamplingConfig(max_new_tokens=8))
    assert reply.choices[0].message.content == tiny_pipe.generate(request)
    assert reply.usage.prompt_tokens == tiny_pipe.measure(request).prompt_tokens
    assert reply.usage.prompt_tokens > tiny_pipe.image_config.image_seq_len  # the image's tokens are counted


def test_jpeg_and_webp_data_urls_are_taken(tiny):
    client = tiny.client()
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        reply = client.chat.completions.create(
            model="m", messages=[image_message(data_url(png_bytes(80, 60, fmt=fmt), mime))], max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_sampling_settings_are_honoured(tiny):
    client = tiny.client()
    ask = dict(model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=1.3,
               top_p=0.9)
    first = client.chat.completions.create(seed=7, **ask).choices[0].message.content
    again = client.chat.completions.create(seed=7, **ask).choices[0].message.content
    assert first == again  # a seed makes sampling repeatable
    short = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=1)
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "length"


def test_models_and_health(tiny):
    client = tiny.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["smolvlm-tiny"] and models.data[0].owned_by == "smoledge"
    assert client.models.retrieve("smolvlm-tiny").id == "smolvlm-tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    health = httpx2.get(tiny.url + "/health", timeout=5)
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["model"] == "smolvlm-tiny"
    assert health.json()["in_flight"] == 0 and health.json()["local"]["available"] is True


# --------------------------------------------------------------------------------------------- routes


@pytest.fixture
def cloudy(tmp_path, router):  # noqa: F811
    """A server whose engine says every image is 17 tiles: over a Raspberry Pi's 5, so images go to the cloud."""
    engine = CountingEngine(LOCAL_TEXT, tiles_per_image=17)
    running = start_server(engine, make_config(tmp_path, router, profile="raspberry-pi-5-4gb", attempts=1))
    yield running, engine, router
    running.stop()


def test_an_oversized_request_goes_to_the_cloud_and_says_why(cloudy):
    running, engine, router = cloudy
    raw = running.client().chat.completions.with_raw_response.create(
        model="m", messages=[image_message(data_url(png_bytes()))], max_tokens=16)
    reply = raw.parse()
    assert reply.choices[0].message.content == CLOUD_TEXT and engine.streams == 0
    assert raw.headers["x-smoledge-route"] == "cloud" and raw.headers["x-smoledge-route-code"] == "oversize"
    assert reply.smoledge == {"route": "cloud", "code": "oversize", "usage_estimated": True,
                              "reason": "17 tiles > 5 allowed on raspberry-pi-5-4gb"}
    sent = router.chat_requests()[-1].body
    assert sent["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_a_text_request_stays_local_on_the_same_server(cloudy):
    running, engine, router = cloudy
    chunks = list(running.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == LOCAL_TEXT
    assert chunks[0].smoledge["route"] == "local" and router.chat_requests() == []


def test_a_local_failure_before_the_first_token_falls_back_to_the_cloud(tmp_path, router):  # noqa: F811
    engine = CountingEngine(LOCAL_TEXT, fail=BackendError("kernel missing"))
    running = start_server(engine, make_config(tmp_path, router, profile="auto", attempts=1))
    try:
        chunks = list(running.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=16, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == CLOUD_TEXT
        assert chunks[0].smoledge["route"] == "cloud" and chunks[0].smoledge["code"] == "local-failed"
        assert "kernel missing" in chunks[0].smoledge["reason"]
        assert httpx2.get(running.url + "/health", timeout=5).json()["local"]["consecutive_failures"] == 1
    finally:
        running.stop()


def test_never_cloud_refuses_an_oversized_request_with_422(tmp_path, router):  # noqa: F811
    config = make_config(tmp_path, router, profile="raspberry-pi-5-4gb", policy=PolicyConfig(never_cloud=True))
    running = start_server(CountingEngine(tiles_per_image=17), config)
    try:
        with pytest.raises(openai.UnprocessableEntityError) as err:
            running.client().chat.completions.create(model="m", messages=[image_message(data_url(png_bytes()))])
        assert err.value.code == "refused_by_policy" and "never-cloud is on" in err.value.message
        assert router.requests == []
    finally:
        running.stop()


def test_a_failing_cloud_is_a_clean_5xx(cloudy):
    from test_cloud_fakes import Reply

    running, engine, router = cloudy
    router.push(*[Reply("500")] * 6)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as err:
            result = running.client().chat.completions.create(
                model="m", messages=[image_message(data_url(png_bytes()))], stream=stream)
            list(result) if stream else None
        assert err.value.status_code in (502, 503)
        assert err.value.body["code"] in ("cloud_unavailable", "cloud_error")


# --------------------------------------------------------------------------------------------- the CLI

BLOCK_WEB = """
import sys
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('starlette', 'uvicorn', 'openai'):
            raise ImportError(f'{name} is blocked', name=name)
sys.meta_path.insert(0, _Blocker())
"""


def _python(code: str):
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run([sys.executable, "-c", BLOCK_WEB + code], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_the_light_runtime_never_imports_the_web_stack(tiny_int4_bundle):
    res = _python(f"""
from smoledge.cli import main
import smoledge.runtime
rc = main(['run', {str(tiny_int4_bundle)!r}, '--prompt', 'hi', '--max-new-tokens', '2'])
assert not any(m.split('.')[0] in ('starlette', 'uvicorn') for m in sys.modules), 'the web stack was imported'
sys.exit(rc)
""")
    assert res.returncode == 0, res.stderr


def test_serve_without_the_web_stack_says_what_to_install(tiny_int4_bundle):
    res = _python(f"""
from smoledge.cli import main
sys.exit(main(['serve', {str(tiny_int4_bundle)!r}, '--port', '0']))
""")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "smoledge serve: error: `smoledge serve` needs the web stack, which is not installed (starlette) "
        "(from the smoledge clone: pip install -e '.[serve]')"]


@pytest.mark.parametrize("flags, message", [(["--queue-size", "-1"], "--queue-size -1 is out of range"),
                                            (["--port", "70000"], "--port 70000 is out of range"),
                                            (["--api-key", " "], "--api-key is empty")])
def test_bad_serve_flags_are_one_line_errors(tiny_int4_bundle, flags, message):
    from conftest import run_cli

    res = run_cli("serve", str(tiny_int4_bundle), *flags, timeout=60)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_serve_defaults_are_the_safe_ones():
    from smoledge.cli import build_parser

    args = build_parser().parse_args(["serve", "bundle/"])
    assert args.host == "127.0.0.1" and args.port == 8000 and not args.allow_remote_images
    assert not args.allow_private_image_hosts and args.queue_size == 8
