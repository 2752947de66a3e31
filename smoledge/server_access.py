"""The access log of ``smoledge serve``: one line per request on stderr, on by default (``--no-access-log``)::

    smoledge serve: POST /v1/chat/completions 200 local 37+24 tokens 2.31 s
    smoledge serve: POST /v1/chat/completions 200 local (5 of 13 tiles) 92+16 tokens 1.80 s
    smoledge serve: GET /health 200 0.00 s

Method, path (no query string, cut at 120 characters, non-printable characters escaped), status, where a
chat request ran (local / cloud), its prompt + completion tokens, and the seconds until the response was
sent in full (a stream's last event); ``(5 of 13 tiles)`` when the tile budget (``--max-tiles``) answered a
photo with fewer tiles.  Nothing from headers or bodies is written: never the API key,
never an image or a prompt.  The chat handler fills the request's :class:`AccessRecord` (``scope``
key ``smoledge.access``) with its route and usage.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

SCOPE_KEY = "smoledge.access"
_MAX_PATH = 120


@dataclass
class AccessRecord:
    route: str | None = None  # local / cloud
    note: str | None = None  # e.g. "5 of 13 tiles": the tile budget answered with fewer tiles
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def format_line(method: str, path: str, status: int | None, record: AccessRecord, seconds: float) -> str:
    shown = path if len(path) <= _MAX_PATH else path[:_MAX_PATH] + "..."
    shown = shown.encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    parts = [method[:16], shown, str(status) if status is not None else "-"]
    if record.route:
        parts.append(record.route)
    if record.note:
        parts.append(f"({record.note})")
    if record.prompt_tokens is not None:
        parts.append(f"{record.prompt_tokens}+{record.completion_tokens or 0} tokens")
    parts.append(f"{seconds:.2f} s")
    return "smoledge serve: " + " ".join(parts)


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class AccessLog:
    """ASGI middleware writing one :func:`format_line` per HTTP request once its response is complete (or
    the client went away)."""

    def __init__(self, app, write: Callable[[str], None] = _stderr_line):
        self.app, self.write = app, write

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, record = time.perf_counter(), None, AccessRecord()
        scope[SCOPE_KEY] = record

        async def logged_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            self.write(format_line(scope["method"], scope["path"], status, record, time.perf_counter() - start))
