"""`smoledge serve` with a tile budget (issue 14, "Profiles"): `--max-tiles auto|N` / SMOLEDGE_MAX_TILES per
request, as `smoledge run` has it, and the calibration record of the backend the server really runs.

A photo that does not fit the device (too many tiles for the profile, or over its memory budget) is answered
locally with fewer tiles instead of the cloud or a refusal; the response (route code ``fewer-tiles`` and its
reason) and the access log say so.  A real `smoledge serve` subprocess on 127.0.0.1 with the tiny bundle, and
the real app in a thread (tests/test_server_fakes.py) for what needs a calibration record or a test engine;
never-cloud throughout, so nothing can leave the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import replace
from types import SimpleNamespace

import openai
import pytest
from conftest import REPO
from test_cloud_fakes import make_config
from test_server_fakes import CountingEngine, data_url, image_message, png_bytes, start_server

from smoledge.cloud_fallback import PolicyConfig, load_profile
from smoledge.cloud_fallback.profiles import Calibration, bundle_key, device_id, save_calibration
from smoledge.cloud_fallback.tile_budget import smaller_configs
from smoledge.runtime.manifest import MeasuredMemory
from smoledge.runtime.types import ChatRequest, ImagePart, Message, SamplingConfig, TextPart

MIB = 2**20
PHOTO = png_bytes(400, 300, seed=5)  # 4:3: 4 x 3 split tiles + the global image = 13 tiles on the tiny bundle
QUESTION = "What is in this photo?"


@pytest.fixture(scope="module")
def pipe(tiny_int4_bundle):
    from smoledge.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_int4_bundle)


def _request(max_new_tokens: int = 8) -> ChatRequest:
    return ChatRequest((Message("user", (ImagePart(PHOTO), TextPart(QUESTION))),),
                       SamplingConfig(max_new_tokens=max_new_tokens))


def _view_with(pipe, tiles: int):
    """The tiny pipeline splitting the photo into ``tiles`` tiles (what the tile budget picks)."""
    for cfg in smaller_configs(pipe.image_config):
        view = pipe.with_image_config(cfg)
        if view.measure(_request()).image_tiles == tiles:
            return view
    raise AssertionError(f"no smaller grid gives {tiles} tiles")


def _ask(client, max_tokens: int = 8):
    return client.chat.completions.with_raw_response.create(
        model="m", messages=[image_message(data_url(PHOTO), QUESTION)], max_tokens=max_tokens, temperature=0)


def _calibrate(cache_dir, manifest, backend: str, *, fixed_mib: int, per_tile_mib: int,
               profile: str = "raspberry-pi-5-4gb"):
    """A record as `doctor --profile PROFILE --calibrate` writes it: measured with that profile's backend options
    (the router applies it only to a backend loaded the same way)."""
    memory = MeasuredMemory(fixed_bytes=fixed_mib * MIB, prefill_bytes_per_token=0,
                            attention_bytes_per_token_squared=0.0, decode_bytes_per_token=0,
                            vision_bytes_per_batch_tile=0, vision_bytes_per_tile=per_tile_mib * MIB, vision_batch=4,
                            load_bytes=fixed_mib * MIB, probes=())
    speed = replace(load_profile("raspberry-pi-5-8gb").speed, source="calibrated")
    options = load_profile(profile).options_for(backend)
    return save_calibration(cache_dir, Calibration(bundle_key(manifest), backend, device_id(), speed, memory,
                                                   options=options))


# ------------------------------------------------------------------------------- `smoledge serve` itself


@pytest.fixture(scope="module")
def served(tiny_int4_bundle, tmp_path_factory):
    """`smoledge serve BUNDLE --max-tiles auto` on raspberry-pi-5-4gb (5 tiles allowed), never-cloud."""
    cache = tmp_path_factory.mktemp("serve-tiles-cache")
    env = {**os.environ, "SMOLEDGE_CACHE_DIR": str(cache), "SMOLEDGE_NO_CLOUD": "1"}
    env.pop("SMOLEDGE_MAX_TILES", None)
    proc = subprocess.Popen([sys.executable, "-m", "smoledge.cli", "serve", str(tiny_int4_bundle), "--port", "0",
                             "--profile", "raspberry-pi-5-4gb", "--max-tiles", "auto", "--threads", "1"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    log, ready = [], threading.Event()

    def drain():
        for line in proc.stderr:
            log.append(line.rstrip("\n"))
            if " on http://" in line:
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(120):
        proc.kill()
        pytest.fail(f"the server did not start: {log}")
    url = next(line for line in log if " on http://" in line).split(" on ", 1)[1].split("/v1")[0]
    yield SimpleNamespace(url=url, log=log, cache=cache, client=openai.OpenAI(base_url=f"{url}/v1", api_key="unused",
                                                                 max_retries=0, timeout=60))
    proc.terminate()
    proc.wait(30)


def test_serve_answers_a_photo_over_the_tile_limit_locally_with_fewer_tiles(served, pipe):
    raw = _ask(served.client)
    reply = raw.parse()
    assert raw.headers["x-smoledge-route"] == "local" and raw.headers["x-smoledge-route-code"] == "fewer-tiles"
    assert reply.smoledge["route"] == "local" and reply.smoledge["code"] == "fewer-tiles"
    reason = reply.smoledge["reason"]
    assert reason.startswith("13 tiles > 5 allowed on raspberry-pi-5-4gb; "), reason
    assert "; answered locally with 5 tiles instead of 13 (fits raspberry-pi-5-4gb: 5 tiles/frames" in reason, reason
    view = _view_with(pipe, 5)  # what the server ran: the same model on a 2 x 2 grid + the global image
    assert reply.choices[0].message.content == view.generate(_request())
    assert reply.usage.prompt_tokens == view.measure(_request()).prompt_tokens
    assert reply.usage.prompt_tokens < pipe.measure(_request()).prompt_tokens  # the full photo's 13 tiles
    assert any("--max-tiles auto" in line for line in served.log if " on http://" in line)  # the banner says it
    posts = [line for line in served.log if line.startswith("smoledge serve: POST /v1/chat/completions 200")]
    assert posts and posts[-1].startswith(
        f"smoledge serve: POST /v1/chat/completions 200 local (5 of 13 tiles) {reply.usage.prompt_tokens}+"), posts


def test_serve_streams_the_fewer_tiles_route_too(served):
    chunks = list(served.client.chat.completions.create(
        model="m", messages=[image_message(data_url(PHOTO), QUESTION)], max_tokens=4, temperature=0, stream=True))
    assert chunks[0].smoledge["code"] == "fewer-tiles" and chunks[-1].smoledge["code"] == "fewer-tiles"


def test_serve_plans_each_request_with_this_devices_calibration(served, pipe):
    # a record of this bundle on this device, written while the server runs: 2,000 MiB + 250 MiB a tile puts
    # every split grid over the Pi's 2,300 MiB; the photo alone (1 tile, no split) fits
    path = _calibrate(served.cache, pipe.manifest, "onnx", fixed_mib=2000, per_tile_mib=250)
    try:
        raw = _ask(served.client)
        reason = raw.parse().smoledge["reason"]
        assert raw.headers["x-smoledge-route-code"] == "fewer-tiles", reason
        assert "answered locally with 1 tiles instead of 13" in reason and "calibrated" in reason, reason
    finally:
        path.unlink()


def test_the_tile_budget_flag_and_variable_reach_the_server_config():
    from smoledge.cli import build_parser
    from smoledge.cloud_fallback import router_config_from_args

    def policy(argv, env):
        return router_config_from_args(build_parser().parse_args(["serve", "b/", *argv]), env=env).policy

    assert policy(["--max-tiles", "3"], {}).max_tiles == 3
    assert policy([], {"SMOLEDGE_MAX_TILES": "auto"}).max_tiles == "auto"
    assert policy(["--max-tiles", "2"], {"SMOLEDGE_MAX_TILES": "auto"}).max_tiles == 2  # the flag wins
    assert policy([], {}).max_tiles is None  # off by default: an unchanged server behaves as before


# ----------------------------------------------------------------- the app in a thread: budgets, backends


def test_a_photo_over_the_calibrated_memory_budget_is_answered_with_fewer_tiles(pipe, tmp_path):
    # raspberry-pi-5-8gb allows 13 tiles in 5,600 MiB; this device's record says 5,000 MiB + 100 MiB a tile:
    # 13 tiles (6,300) and 10 (6,000) are over, 5 (5,500) fits
    _calibrate(tmp_path, pipe.manifest, "onnx", fixed_mib=5000, per_tile_mib=100, profile="raspberry-pi-5-8gb")
    config = make_config(tmp_path, profile="raspberry-pi-5-8gb", policy=PolicyConfig(never_cloud=True, max_tiles="auto"))
    running = start_server(pipe, config)
    try:
        raw = _ask(running.client())
        reason = raw.parse().smoledge["reason"]
        assert raw.headers["x-smoledge-route-code"] == "fewer-tiles", reason
        assert reason.startswith("estimated peak memory ") and "calibrated" in reason, reason
        assert "answered locally with 5 tiles instead of 13" in reason, reason
        assert raw.parse().choices[0].message.content == _view_with(pipe, 5).generate(_request())
    finally:
        running.stop()
    without = make_config(tmp_path, profile="raspberry-pi-5-8gb", policy=PolicyConfig(never_cloud=True))
    running = start_server(pipe, without)
    try:  # no tile budget: the same photo is refused, and the refusal says how to get one
        with pytest.raises(openai.UnprocessableEntityError) as err:
            _ask(running.client())
        assert err.value.code == "refused_by_policy" and "--max-tiles auto" in err.value.message
    finally:
        running.stop()


class _ExecuTorchEngine(CountingEngine):
    """A test engine that says it runs the ExecuTorch format, as a Pipeline with that backend does."""

    backend = SimpleNamespace(name="executorch")


def test_the_server_applies_the_calibration_of_the_backend_it_serves(tmp_path):
    engine = _ExecuTorchEngine()
    # this bundle's ONNX record fits the 4 GB Pi; its ExecuTorch record on this device does not
    _calibrate(tmp_path, engine.manifest, "onnx", fixed_mib=100, per_tile_mib=1)
    _calibrate(tmp_path, engine.manifest, "executorch", fixed_mib=9000, per_tile_mib=1)
    config = make_config(tmp_path, profile="raspberry-pi-5-4gb", policy=PolicyConfig(never_cloud=True))
    running = start_server(engine, config)
    try:
        with pytest.raises(openai.UnprocessableEntityError) as err:
            running.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert err.value.code == "refused_by_policy"
        assert "estimated peak memory 9.44 GB > 2.41 GB budget" in err.value.message, err.value.message
        assert "calibrated" in err.value.message
        assert engine.streams == 0
    finally:
        running.stop()
