"""The lean ONNX decoder (issue 14): GroupQueryAttention over a preallocated KV buffer shared in place,
logits for the positions asked for only, and the all-positions path fidelity scoring uses.

``tests/fixtures/decoder_tokens_v2.json`` holds the greedy tokens of the decoder before this change (the
concatenating-cache graph), recorded on the tiny model for 32 steps: text only, one image, two images, on the
fp32 and the default int4 bundles.  The new decoder must give the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_image
from smoledge.runtime import ChatRequest, Message, SamplingConfig, load
from smoledge.runtime.generate import Sampler, generate_step

FIXTURE = Path(__file__).parent / "fixtures" / "decoder_tokens_v2.json"
STEPS = 32
TEXT = "What is in this image?"
CASES = {"text-only": [], "one-image": [(100, 70)], "two-images": [(60, 60), (200, 90)]}


def greedy_tokens(pipe, case: str, steps: int = STEPS) -> list[int]:
    """``steps`` greedy tokens (EOS ignored) of the tiny model on one of CASES."""
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(CASES[case])]
    request = ChatRequest((Message.user(TEXT, images),), SamplingConfig(max_new_tokens=steps))
    prepared = pipe.prepare(request)
    cache = pipe.backend.new_cache(prepared.input_ids.shape[1] + steps)
    sampler = Sampler(SamplingConfig(temperature=0.0))
    return [token for token, _ in generate_step(pipe.backend, pipe.prompt_embeds(prepared), cache, sampler, steps)]


def record(bundles: dict[str, Path]) -> dict:
    """The fixture's content for ``bundles`` ({recipe: bundle}); run once on the decoder being replaced."""
    return {"steps": STEPS, "text": TEXT, "cases": CASES,
            "tokens": {recipe: {case: greedy_tokens(load(path), case) for case in CASES}
                       for recipe, path in bundles.items()}}
