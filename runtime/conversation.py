"""A multi-turn chat on one loaded bundle that keeps its KV cache and image features between turns.

    conv = Conversation(smoledge.runtime.load("bundle/"), system="Be brief.")
    for chunk in conv.ask("What is in this picture?", images=["cat.png"]):
        print(chunk.text, end="")
    print(conv.say("And its colour?"))  # the picture is not encoded again; the first turn is not re-run

Each turn renders the whole conversation with the bundle's chat template (as a from-scratch request
would be rendered) and tokenizes it.  The cache holds the tokens of everything said so far, in order;
when the new prompt starts with exactly those tokens, only the rest (the end of the last answer, the new
user turn, the generation prompt) is run through the decoder: the backend's ``step`` appends to the
cache.  When it does not - a template that renders past turns differently from how it prompted them, an
answer cut by a stop string, a retokenization that differs from the sampled tokens - the cache is
started afresh for the whole prompt (the template decides, so the answer is what a from-scratch run of
the conversation gives); the image features are reused in either case.  ``last_turn`` says which
happened.  A turn's own images are encoded once, in the turn that brings them.

Only the Backend protocol is used (``embed``, ``encode_images``, ``new_cache``, ``step``); no cloud
fallback: the conversation's state lives on this device.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from smoledge.errors import InputError, PromptTooLongError
from smoledge.runtime.generate import Sampler, generate_step, generate_text, stream_generate
from smoledge.runtime.preprocess import preprocess
from smoledge.runtime.types import ChatRequest, ImagePart, Message, SamplingConfig, StreamChunk, TextPart


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # the whole conversation's prompt this turn
    reused_tokens: int = 0  # of them, already in the KV cache (not run again)
    completion_tokens: int = 0
    images_encoded: int = 0  # images this turn sent through the vision encoder
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0


class Conversation:
    """Turns on one :class:`~smoledge.runtime.pipeline.Pipeline`; not thread-safe (one conversation, one user)."""

    def __init__(self, pipe, system: str | None = None, sampling: SamplingConfig = SamplingConfig()):
        self.pipe = pipe
        self.sampling = sampling
        self.system = system
        self.last_turn = TurnStats()
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages: list[Message] = [Message("system", (TextPart(self.system),))] if self.system else []
        self._grids: list[tuple[int, int]] = []  # per image of ``messages``, in order
        self._features: list[np.ndarray] = []  # per image: [tiles * image_seq_len, hidden]
        self._cache = None
        self._cached: list[int] = []  # the token ids the cache holds, in order

    def say(self, text: str, images: Sequence = (), sampling: SamplingConfig | None = None) -> str:
        """Ask and return the whole answer."""
        return generate_text(self.ask(text, images, sampling))

    def ask(self, text: str, images: Sequence = (), sampling: SamplingConfig | None = None) -> Iterator[StreamChunk]:
        """The answer to a new user turn (text after its images), chunk by chunk.  The turn and the answer
        (as far as it was consumed) join the conversation."""
        cfg = sampling or self.sampling
        user = Message("user", tuple(ImagePart(i) for i in images) + (TextPart(text),))
        if not text.strip() and not images:
            raise InputError("the turn is empty", hint="type a question")
        stats = self.last_turn = TurnStats()
        start = time.perf_counter()
        grids, features = self._encode(list(images))
        stats.images_encoded = len(grids)
        all_grids = self._grids + grids
        ids = self.pipe.prompt_ids(ChatRequest((*self.messages, user), cfg), all_grids)[0].tolist()
        self._check_fits(len(ids), cfg.max_new_tokens)
        reuse = self._cache is not None and len(ids) > len(self._cached) and ids[:len(self._cached)] == self._cached
        start_at = len(self._cached) if reuse else 0
        embeds = self._embeds(ids, start_at, self._features + features)
        # the turn is accepted: from here on the conversation holds it, whatever happens to the answer
        self.messages.append(user)
        self._grids, self._features = all_grids, self._features + features
        if not reuse:
            self._cache = self.pipe.backend.new_cache(self.pipe.context_length)
        stats.prompt_tokens, stats.reused_tokens = len(ids), start_at
        self._cached = ids  # the prefill below puts the whole prompt in the cache
        steps = generate_step(self.pipe.backend, embeds, self._cache, Sampler(cfg), cfg.max_new_tokens)
        yield from self._answer(steps, cfg, start)

    def _answer(self, steps, cfg: SamplingConfig, start: float) -> Iterator[StreamChunk]:
        stats, sampled, pieces = self.last_turn, [], []

        def tracked():
            for token, logits in steps:
                if sampled:  # the token before this one was fed to the decoder to get these logits
                    self._cached.append(sampled[-1])
                sampled.append(token)
                yield token, logits

        pipe = self.pipe
        try:
            for chunk in stream_generate(tracked(), pipe.tokenizer, pipe.eos_ids, cfg.stop, cfg.max_new_tokens):
                stats.completion_tokens += 1
                if stats.completion_tokens == 1:
                    stats.time_to_first_token_s = time.perf_counter() - start
                pieces.append(chunk.text)
                yield chunk
        finally:
            stats.total_s = time.perf_counter() - start
            if not sampled:  # the prefill did not run (or failed): the cache no longer says what it holds
                self._cache, self._cached = None, []
            self.messages.append(Message("assistant", (TextPart(self._history_text("".join(pieces))),)))

    def _history_text(self, answer: str) -> str:
        """The answer as the conversation records it: as generated, or with the surrounding white space the
        template writes itself removed, whichever renders back to the tokens the cache holds (so the next turn
        extends the cache); stripped when neither does (the next turn then starts the cache afresh)."""
        for text in dict.fromkeys((answer, answer.lstrip(), answer.strip())):
            messages = (*self.messages, Message("assistant", (TextPart(text),)))
            ids = self.pipe.prompt_ids(ChatRequest(messages), self._grids)[0].tolist()
            if ids[:len(self._cached)] == self._cached:
                return text
        return answer.strip()

    def _encode(self, images: list) -> tuple[list[tuple[int, int]], list[np.ndarray]]:
        """Tile grids and features [tiles * image_seq_len, hidden] of this turn's images."""
        if not images:
            return [], []
        processed = preprocess(images, self.pipe.image_config)
        features = self.pipe.backend.encode_images(processed.pixel_values, processed.pixel_attention_mask)
        features = features.reshape(-1, features.shape[-1])
        per_image = [n * (len(features) // len(processed.pixel_values)) for n in processed.tiles_per_image]
        return list(processed.grids), np.split(features, np.cumsum(per_image)[:-1])

    def _embeds(self, ids: list[int], start: int, image_features: list[np.ndarray]) -> np.ndarray:
        """Embeddings of ``ids[start:]`` with the image features in their slots."""
        ids_array = np.asarray([ids], dtype=np.int64)
        slot = self.pipe.image_token_id
        before = int(np.count_nonzero(ids_array[0, :start] == slot))
        new = ids_array[:, start:]
        embeds = self.pipe.backend.embed(new)
        slots = np.flatnonzero(new[0] == slot)
        if len(slots):
            features = np.concatenate(image_features)[before:before + len(slots)]
            if len(features) != len(slots):
                raise InputError(f"the prompt has {before + len(slots)} image slots for "
                                 f"{before + len(features)} image features",
                                 hint="the prompt must not contain the literal image token text")
            embeds = embeds.copy()
            embeds[0, slots] = features
        return embeds

    def _check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        window = self.pipe.context_length
        if prompt_tokens + max_new_tokens > window:
            raise PromptTooLongError(
                f"the conversation ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context window of {window}",
                hint="start a new conversation (/reset in `smoledge chat`) or lower --max-new-tokens")
