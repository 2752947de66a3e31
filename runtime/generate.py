"""Generation in three layers, shared by every backend:

1. :func:`generate_step` yields ``(token_id, logits)``: prefill once, then one decoder step per token.
2. :func:`stream_generate` yields :class:`StreamChunk` s: detokenised text, stop tokens and strings,
   ``max_new_tokens``, a finish reason.
3. :func:`generate_text` returns the whole answer.

The sampler is a small object built from a :class:`SamplingConfig`: greedy when temperature is 0,
otherwise temperature, top-k, top-p, repetition penalty, seeded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from smoledge.errors import DegenerateOutputError
from smoledge.interrupts import check as check_interrupt
from smoledge.runtime.types import SamplingConfig, StreamChunk


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        cfg = self.config
        logits = logits.astype(np.float64, copy=True)
        if cfg.repetition_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history))
            picked = logits[seen]
            logits[seen] = np.where(picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty)
        if cfg.temperature <= 0:
            return int(np.argmax(logits))
        logits /= cfg.temperature
        if cfg.top_k and cfg.top_k < logits.size:
            kth = np.partition(logits, -cfg.top_k)[-cfg.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            cut = order[np.searchsorted(cumulative, cfg.top_p) + 1:]
            probs[cut] = 0.0
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def generate_step(backend, prompt_embeds: np.ndarray, cache, sampler: Sampler,
                  max_new_tokens: int) -> Iterator[tuple[int, np.ndarray]]:
    """Layer 1: prefill ``prompt_embeds`` then decode; yields each token with the logits it came from.
    A Ctrl-C (:mod:`smoledge.interrupts`) is acted on between steps, never inside the backend."""
    history: list[int] = []
    check_interrupt()
    logits = backend.step(prompt_embeds, cache)
    while True:
        if not np.isfinite(logits).all():
            raise DegenerateOutputError(f"the model produced NaN/Inf logits at step {len(history)}",
                                        hint="the bundle's weights or the backend are broken; re-export")
        token = sampler(logits, history)
        history.append(token)
        yield token, logits
        if len(history) >= max_new_tokens:
            return
        check_interrupt()
        logits = backend.step(backend.embed(np.array([[token]], dtype=np.int64)), cache)


class IncrementalDecoder:
    """Text for a growing list of token ids, emitted only once a UTF-8 character is complete."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return ""
        new, self.text = full[len(self.text):], full
        return new


def _held_back(text: str, stops: Iterable[str]) -> int:
    """How many trailing characters could still grow into a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold


def stream_generate(steps: Iterable[tuple[int, np.ndarray]], tokenizer, eos_ids: Iterable[int],
                    stop: tuple[str, ...] = (), max_new_tokens: int = 256) -> Iterator[StreamChunk]:
    """Layer 2: tokens -> text chunks, ending on an EOS id, a stop string or ``max_new_tokens``."""
    eos = set(eos_ids)
    decoder = IncrementalDecoder(tokenizer)
    sent = 0  # characters of decoder.text already yielded
    count = 0
    for token, _logits in steps:
        count += 1
        if token in eos:
            yield StreamChunk(decoder.text[sent:], token, "stop")
            return
        decoder.add(token)
        text = decoder.text
        # Prefixes of stop strings are held back, so a stop string can only start at or after `sent`.
        hits = [i for i in (text.find(s, sent) for s in stop) if i >= 0]
        if hits:
            yield StreamChunk(text[sent:min(hits)], token, "stop")
            return
        if count >= max_new_tokens:
            yield StreamChunk(text[sent:], token, "length")
            return
        upto = len(text) - _held_back(text, stop)
        if upto > sent:
            yield StreamChunk(text[sent:upto], token)
            sent = upto
        else:
            yield StreamChunk("", token)


def generate_text(chunks: Iterable[StreamChunk]) -> str:
    """Layer 3: the whole answer."""
    return "".join(chunk.text for chunk in chunks)
