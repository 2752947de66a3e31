"""The tile budget (issue 14, "Profiles"): a photo that does not fit the device by its tiles or its measured
memory is answered locally with fewer tiles under --max-tiles auto, instead of going to the cloud; the route
says so.  The tiny bundle's real pipeline; the cloud is the fake router on 127.0.0.1."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import synthetic_image
from test_cloud_fakes import make_config, router  # noqa: F401

from smoledge.cloud_fallback import PolicyConfig, answer_text
from smoledge.cloud_fallback.answer import answer
from smoledge.cloud_fallback.policy import estimate
from smoledge.errors import CloudDisabledError
from smoledge.runtime import load
from smoledge.runtime.types import ChatRequest, Message, RequestShape, SamplingConfig


@pytest.fixture(scope="module")
def pipe(tiny_int4_bundle):
    return load(tiny_int4_bundle)


def _photo(max_new_tokens=4):  # 4:3, so 4 x 3 tiles + the global image on the tiny bundle
    return ChatRequest((Message.user("What is in this photo?", [synthetic_image(400, 300)]),),
                       SamplingConfig(max_new_tokens=max_new_tokens))


def test_too_many_tiles_answered_locally_with_fewer(pipe, tmp_path, router):  # noqa: F811
    request = _photo()
    assert pipe.measure(request).image_tiles == 13
    cfg = make_config(tmp_path, router, policy=PolicyConfig(max_tiles="auto"))  # raspberry-pi-5-4gb: 5 tiles
    reply = answer_text(request, pipe, config=cfg)
    assert reply.decision.route == "local" and reply.decision.code == "fewer-tiles"
    assert reply.decision.reason.startswith("13 tiles > 5 allowed on raspberry-pi-5-4gb; answered locally with "
                                            "5 tiles instead of 13 (fits raspberry-pi-5-4gb: 5 tiles/frames")
    assert reply.text and router.requests == []
    assert pipe.measure(request).image_tiles == 13  # the shared pipeline keeps its own settings


def test_a_photo_over_the_memory_budget_answered_with_fewer_tiles(pipe, tmp_path, router):  # noqa: F811
    cfg = make_config(tmp_path, router, profile="raspberry-pi-5-8gb", policy=PolicyConfig(max_tiles="auto"))
    manifest = pipe.manifest

    def peak(tiles, prompt):
        return estimate(RequestShape(prompt, 4, image_tiles=tiles, images=1), manifest, cfg.profile, "onnx")

    request = _photo()
    full = peak(13, pipe.measure(request).prompt_tokens)
    budget = full.peak_memory_bytes - 1  # the full grid is one byte over; a smaller one fits
    cfg = replace(cfg, profile=replace(cfg.profile, memory_budget_bytes=budget))
    reply = answer_text(request, pipe, config=cfg)
    assert reply.decision.code == "fewer-tiles" and reply.decision.reason.startswith("estimated peak memory ")
    assert "measured at export" in reply.decision.reason and "answered locally with 10 tiles instead of 13" \
        in reply.decision.reason
    assert router.requests == []


def test_a_fixed_tile_budget_caps_every_photo(pipe, tmp_path, router):  # noqa: F811
    cfg = make_config(tmp_path, router, profile="raspberry-pi-5-8gb", policy=PolicyConfig(max_tiles=1))
    reply = answer_text(_photo(), pipe, config=cfg)
    assert reply.decision.code == "fewer-tiles"
    assert reply.decision.reason.startswith("--max-tiles 1; answered locally with 1 tiles instead of 13")


def test_without_a_tile_budget_the_refusal_says_how_to_get_one(pipe, tmp_path, router):  # noqa: F811
    cfg = make_config(tmp_path, router, policy=PolicyConfig(never_cloud=True))
    with pytest.raises(CloudDisabledError, match="13 tiles > 5 allowed") as info:
        answer(_photo(), pipe, config=cfg)
    assert "--max-tiles auto" in info.value.hint


def test_run_stats_show_the_run_that_answered_with_fewer_tiles(tiny_int4_bundle, tmp_path, capsys):
    """`run --stats` after a tile reduction: the figures of the reduced run, not the zeros of the pipeline
    that was loaded but never ran (the view with fewer tiles did)."""
    import re

    from smoledge.cli import main

    photo = tmp_path / "photo.png"
    synthetic_image(400, 300).save(photo)
    rc = main(["run", str(tiny_int4_bundle), "What is in this photo?", "--image", str(photo), "--max-tiles", "auto",
               "--profile", "raspberry-pi-5-4gb", "--no-cloud", "--stats", "--max-new-tokens", "4",
               "--temperature", "0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "answered locally with 5 tiles instead of 13" in err, err
    head = re.search(r"\[onnx: (\d+) prompt tokens, (\d+) tiles, (\d+) new tokens\]", err)
    assert head is not None, err
    prompt, tiles, new = map(int, head.groups())
    assert tiles == 5 and prompt > 0 and 1 <= new <= 4, err
    assert re.search(r"prompt eval = +[0-9.]+ ms / +%d tokens" % prompt, err), err
