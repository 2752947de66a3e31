"""The generation layers on their own: sampler, stop tokens and strings, incremental detokenising."""

from __future__ import annotations

import numpy as np
import pytest

from smoledge.runtime.generate import IncrementalDecoder, Sampler, generate_text, stream_generate
from smoledge.runtime.types import SamplingConfig


class _ByteTokenizer:
    """Token i decodes to chr(i); token 0xC3 + 0xA9 decodes to 'é' only together (UTF-8)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def _steps(tokens):
    return ((t, np.zeros(4)) for t in tokens)


def test_greedy_is_argmax_and_ignores_seed():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingConfig())(logits, []) == 1
    assert Sampler(SamplingConfig(seed=5))(logits, []) == 1


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    logits = np.random.default_rng(0).normal(size=50)
    cfg = SamplingConfig(temperature=1.0, seed=7)
    a = [Sampler(cfg)(logits, []) for _ in range(3)]
    b = [Sampler(cfg)(logits, []) for _ in range(3)]
    assert a == b
    assert Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=1))(logits, []) == int(np.argmax(logits))


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.7, 0.2, 0.05, 0.05]))
    sampler = Sampler(SamplingConfig(temperature=1.0, top_p=0.8, seed=0))
    picks = {sampler(logits, []) for _ in range(200)}
    assert picks <= {0, 1} and picks == {0, 1}


def test_repetition_penalty_discourages_seen_tokens():
    logits = np.array([2.0, 1.9, 0.0])
    assert Sampler(SamplingConfig(repetition_penalty=1.5))(logits, [0]) == 1


def test_incremental_decoder_waits_for_a_whole_character():
    dec = IncrementalDecoder(_ByteTokenizer())
    assert dec.add(ord("a")) == "a"
    assert dec.add(0xC3) == ""
    assert dec.add(0xA9) == "é"


def test_stream_stops_on_eos_and_reports_length():
    chunks = list(stream_generate(_steps([104, 105, 2, 106]), _ByteTokenizer(), eos_ids=[2], max_new_tokens=10))
    assert generate_text(chunks) == "hi" and chunks[-1].finish_reason == "stop"
    chunks = list(stream_generate(_steps([104, 105, 106]), _ByteTokenizer(), eos_ids=[2], max_new_tokens=2))
    assert generate_text(chunks) == "hi" and chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("stop", ["END", "ab"])
def test_stop_string_is_cut_and_never_streamed(stop):
    text = "xyzab ENDtail"
    chunks = list(stream_generate(_steps([ord(c) for c in text]), _ByteTokenizer(), eos_ids=[], stop=(stop,),
                                  max_new_tokens=100))
    streamed = [c.text for c in chunks]
    assert generate_text(chunks) == text[: text.index(stop)]
    assert all(stop not in s for s in streamed)
    assert chunks[-1].finish_reason == "stop"
