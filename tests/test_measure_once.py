"""A local run renders and tokenizes its prompt once: the plan routing measured is what generation uses."""

from __future__ import annotations

import argparse

import pytest

from conftest import synthetic_image
from smoledge.cloud_fallback import add_routing_arguments, answer, router_config_from_args
from smoledge.runtime import ChatRequest, Message, SamplingConfig, load


class CountingTokenizer:
    """The bundle's own tokenizer, counting ``encode`` calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encodes = tokenizer, 0

    def encode(self, *args, **kwargs):
        self.encodes += 1
        return self.tokenizer.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture
def pipe(tiny_int4_bundle):
    pipe = load(tiny_int4_bundle)
    pipe.tokenizer = CountingTokenizer(pipe.tokenizer)
    return pipe


def _config(tmp_path):
    parser = argparse.ArgumentParser()
    add_routing_arguments(parser)
    return router_config_from_args(parser.parse_args(["--no-cloud"]), {"SMOLEDGE_CACHE_DIR": str(tmp_path)})


def _request(text="What is in this image?"):
    return ChatRequest((Message.user(text, [synthetic_image(120, 80, seed=1)]),), SamplingConfig(max_new_tokens=3))


def test_a_routed_local_run_tokenizes_the_prompt_once(pipe, tmp_path):
    request = _request()
    result = answer(request, pipe, config=_config(tmp_path))
    chunks = list(result)
    assert result.decision.route == "local" and chunks
    assert pipe.tokenizer.encodes == 1
    assert pipe.last_stats.prompt_tokens == pipe.measure(request).prompt_tokens  # the same prompt, measured again


def test_the_measured_ids_are_the_ones_generation_uses(pipe):
    request = _request()
    shape = pipe.measure(request)
    prepared = pipe.prepare(request)
    assert pipe.tokenizer.encodes == 1 and prepared.input_ids.shape[1] == shape.prompt_tokens
    assert pipe.prepare(request).input_ids.tolist() == prepared.input_ids.tolist()  # plan used up: rendered again
    assert pipe.tokenizer.encodes == 2


def test_a_plan_is_never_used_for_another_request(pipe):
    first, second = _request(), _request("Describe it in one word.")
    pipe.measure(first)
    prepared = pipe.prepare(second)
    assert pipe.tokenizer.encodes == 2
    assert prepared.input_ids.tolist() != pipe.prepare(first).input_ids.tolist()
