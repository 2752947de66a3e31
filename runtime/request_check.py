"""The one validation layer for request parameters, shared by ``smoledge run`` and ``smoledge serve``.

A request that passes :func:`check_request` cannot fail inside the engine for a reason the user
controls: sampling numbers are finite and in range, the seed is one numpy takes, stop strings are
not empty, and every text is valid Unicode (no lone surrogates: invalid UTF-8 on a command line or a
``"\\ud800"`` escape in JSON).  Each failure is a :class:`~smoledge.errors.ParameterError` naming
the parameter, so the CLI prints one line and the server answers 400 with that ``param``; bad input
is therefore never counted against local health and never sent to the cloud
(:func:`smoledge.errors.classify`).
"""

from __future__ import annotations

import math

from smoledge.errors import ParameterError
from smoledge.runtime.types import ChatRequest, SamplingConfig, TextPart

MAX_SEED = 2**64 - 1  # numpy's Generator takes any non-negative integer; the cloud APIs take 64 bits
MAX_THREADS = 1024


def check_request(request: ChatRequest) -> ChatRequest:
    """Raise ParameterError for the first bad parameter; return the request unchanged."""
    check_sampling(request.sampling)
    for i, message in enumerate(request.messages):
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                check_text(part.text, f"messages[{i}].content[{j}]")
    return request


def check_sampling(s: SamplingConfig) -> None:
    _integer(s.max_new_tokens, "max_new_tokens", 1)
    _finite(s.temperature, "temperature", low=0.0)
    _finite(s.top_p, "top_p", low=0.0, open_low=True, high=1.0)
    _finite(s.repetition_penalty, "repetition_penalty", low=0.0, open_low=True)
    _integer(s.top_k, "top_k", 0)
    if s.seed is not None:
        _integer(s.seed, "seed", 0, MAX_SEED)
    for k, stop in enumerate(s.stop):
        if not isinstance(stop, str) or not stop:
            raise ParameterError("a stop string is empty (it would end every answer at once)", param="stop",
                                 hint="give non-empty stop strings, or none")
        check_text(stop, f"stop[{k}]")


def check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ParameterError(f"{where} is not valid UTF-8 text (a lone surrogate or undecodable byte at "
                             f"character {err.start})", param=where,
                             hint="send UTF-8 text; re-save the prompt file as UTF-8") from None


def check_threads(threads: int, flag: str = "--threads") -> None:
    _integer(threads, flag, 0, MAX_THREADS, hint="0 means the runtime's default")


def _integer(value, name: str, low: int, high: int | None = None, *, hint: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(f"{name} must be an integer, got {value!r}", param=name, hint=hint)
    if value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f"at least {low}"
        raise ParameterError(f"{name} must be {span}, got {value}", param=name, hint=hint)


def _finite(value, name: str, *, low: float, high: float | None = None, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParameterError(f"{name} must be a finite number, got {value!r}", param=name)
    if value < low or (open_low and value == low) or (high is not None and value > high):
        side = f"> {low:g}" if open_low else f">= {low:g}"
        span = f"{side}" + (f" and <= {high:g}" if high is not None else "")
        raise ParameterError(f"{name} must be {span}, got {value}", param=name)
