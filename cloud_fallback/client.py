"""The one place that talks HTTP: the router's OpenAI-compatible ``/chat/completions`` and ``/models``.

Why not ``huggingface_hub.InferenceClient.chat_completion``: it returns parsed chunks only, so the
``x-inference-provider`` response header (which provider served the call: the ledger's provider and
price) is lost; it has one timeout for connect and read alike and no total; a streamed response stays
open on the client's exit stack until the client is closed; it has no ``/models`` (pricing) call; and
with ``HF_DEBUG`` its shared session logs request bodies, i.e. prompts.  So this module speaks the
same API with ``httpx2`` (the HTTP library huggingface_hub itself uses), and huggingface_hub is used
for what it is best at: finding the token (``HF_TOKEN`` or the ``hf auth login`` file).

Every failure - every ``httpx2`` exception included - is raised as a :mod:`smoledge.errors` cloud error
with three extra attributes the failover loop reads: ``status`` (a short code for the ledger, e.g.
``http_429``; never upstream text), ``retry_after`` (seconds from a Retry-After header, or None) and
``cools`` (False for errors the request caused - 400/413/422, a stream's ``validation`` error - which
must not cool a healthy target down for everyone).  ``CallRecord.answered`` says whether the router's
200 status line arrived (the provider is then generating, and billing: the call is not retried).

The token is only sent over https, or to a loopback address (a local gateway or test server).
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from smoledge.errors import (
    CloudAuthError,
    CloudCreditError,
    CloudError,
    CloudModelError,
    CloudProtocolError,
    CloudRateLimitError,
    CloudUnavailableError,
)
from smoledge.runtime.types import StreamChunk

from .config import CloudConfig
from .request_builder import HttpCall, auth_headers, models_url
from .retry import parse_retry_after

_SETTINGS = "https://huggingface.co/settings"


@dataclass
class CallRecord:
    """What one HTTP call did, filled in while it runs (the ledger's row, minus routing and price)."""

    target: str
    provider: str | None = None
    status: str = "started"
    tokens_in: int | None = None
    tokens_out: int | None = None
    latency_s: float = 0.0
    answered: bool = False  # the 200 status line arrived: the provider is generating (and billing)


_SAFE_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FINISH = re.compile(r"[a-z][a-z_]{0,31}")


def tag(err: CloudError, status: str, retry_after: float | None = None, *, cools: bool = True) -> CloudError:
    err.status = status  # type: ignore[attr-defined]
    err.retry_after = retry_after  # type: ignore[attr-defined]
    err.cools = cools  # type: ignore[attr-defined]
    return err


def safe_code(value: str | None) -> str | None:
    """An upstream identifier (provider name) if it looks like one; upstream text never reaches the ledger."""
    return value if value is not None and _SAFE_CODE.fullmatch(value) else None


def token_allowed(base_url: str) -> bool:
    """The token may go to https URLs, or to a loopback host over plain http (False for a URL that does not parse)."""
    try:
        parsed = urlparse(base_url)
        parsed.hostname  # noqa: B018 - raises ValueError for a broken IPv6 literal
    except ValueError:
        return False
    if parsed.scheme == "https":
        return True
    host = (parsed.hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RouterClient:
    """HTTP to one router base URL.  Use as a context manager, or call ``close()``."""

    def __init__(self, config: CloudConfig):
        import httpx2

        self._httpx = httpx2
        self.config = config
        try:
            self._host = urlparse(config.base_url).netloc or config.base_url
        except ValueError:
            self._host = config.base_url
        self._http = httpx2.Client(follow_redirects=False)

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _timeout(self, deadline: float | None, read_s: float | None = None):
        left = float("inf") if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise tag(CloudUnavailableError("the cloud time budget was used up before this call",
                                            hint="raise --deadline or SMOLEDGE_CLOUD_BUDGET_S"), "budget")
        c, r = self.config.connect_timeout_s, self.config.read_timeout_s if read_s is None else read_s
        return self._httpx.Timeout(connect=min(c, left), read=min(r, left), write=min(r, left), pool=min(c, left))

    def _check_secure(self) -> None:
        if not token_allowed(self.config.base_url):
            raise tag(CloudAuthError(f"refusing to send the Hugging Face token to {self._host} over plain http",
                                     hint="use an https:// SMOLEDGE_CLOUD_BASE_URL (plain http only to a "
                                          "loopback address)"), "insecure")

    def stream_chat(self, call: HttpCall, record: CallRecord, deadline: float | None = None,
                    first_by: float | None = None) -> Iterator[StreamChunk]:
        """POST ``call`` and yield the answer's text chunks; fills ``record`` as it goes.

        ``deadline`` (monotonic seconds) bounds the whole call - connect, silence and a trickling stream
        alike; ``first_by`` only the wait for its first chunk (after it, ``CloudConfig.total_timeout_s``).
        """
        self._check_secure()
        started = time.monotonic()
        whole = _Limit.of(started + self.config.total_timeout_s, deadline)
        limit = _Limit.of(whole.at, first_by) if first_by is not None else whole
        try:
            with self._http.stream(call.method, call.url, headers=call.headers, json=call.json,
                                   timeout=self._timeout(limit.at)) as response:
                limit.watch(response)
                record.provider = safe_code(response.headers.get("x-inference-provider")) or record.provider
                if response.status_code >= 300:
                    response.read()
                    raise self._http_error(response, record.target)
                record.answered = True
                for n, chunk in enumerate(self._read_answer(response, record, limit)):
                    if n == 0 and limit is not whole:
                        limit.rearm(whole)  # the answer has started: only the call's own limits hold now
                    yield chunk
            record.status = "ok"
        except (self._httpx.HTTPError, self._httpx.InvalidURL, self._httpx.StreamError) as err:
            raise self._transport_error(err, record, limit) from err
        finally:
            limit.cancel()
            record.latency_s = time.monotonic() - started

    def _transport_error(self, err: Exception, record: CallRecord, limit: _Limit) -> CloudError:
        name, target = type(err).__name__, record.target
        if time.monotonic() >= limit.at - 0.05:  # a read timeout at the limit, or the watchdog's cut
            return limit.error(target, name)
        if isinstance(err, self._httpx.TimeoutException):
            return tag(CloudUnavailableError(f"{target}: no answer from {self._host} in time ({name})",
                                             hint="check the network, or raise CloudConfig.read_timeout_s"), "timeout")
        if isinstance(err, self._httpx.RemoteProtocolError):
            return tag(CloudUnavailableError(f"{target}: connection to {self._host} dropped mid-answer",
                                             hint="retry; check the network"), "dropped")
        if isinstance(err, (self._httpx.DecodingError, self._httpx.TooManyRedirects, self._httpx.StreamError)):
            return _malformed(target, f"{name}")
        if isinstance(err, self._httpx.InvalidURL):
            return tag(CloudUnavailableError(f"the cloud router URL {self.config.base_url!r} is not valid ({name})",
                                             hint="fix SMOLEDGE_CLOUD_BASE_URL"), "invalid_url")
        return tag(CloudUnavailableError(f"cannot reach the cloud router at {self._host}: {name}",
                                         hint="check the network and SMOLEDGE_CLOUD_BASE_URL"), "unreachable")

    def _read_answer(self, response: Any, record: CallRecord, limit: _Limit) -> Iterator[StreamChunk]:
        content_type = response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:  # a server that ignored stream=true
            yield from self._whole_answer(_read_all(response, record, limit), record)
            return
        finished, produced = False, False
        for event in _sse_events(response.iter_bytes(), record, limit):
            if event == "[DONE]":
                finished = True
                break
            chunk, done = _stream_event(_loads(event, record.target), record)
            finished = finished or done
            if chunk is not None:
                produced = True
                yield chunk
        if not finished:
            raise tag(CloudUnavailableError(f"{record.target}: the answer stream ended before it was complete",
                                            hint="retry; check the network"), "dropped")
        if not produced:
            raise _empty(record.target)

    def _whole_answer(self, body: bytes, record: CallRecord) -> Iterator[StreamChunk]:
        data = _loads(body, record.target)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise _malformed(record.target, "no choices[0].message") from err
        _read_usage(data, record)
        finish = _finish(choice.get("finish_reason"))
        if not text and finish is None:
            raise _empty(record.target)
        yield StreamChunk(text=text, finish_reason=finish or "stop")

    def _http_error(self, response: Any, target: str) -> CloudError:
        code = response.status_code
        detail = _server_message(response)
        retry_after = parse_retry_after(response.headers.get("retry-after"), now=time.time())
        if code < 400:
            return _malformed(target, f"HTTP {code} redirect, not followed")
        if code in (401, 403):
            return tag(CloudAuthError(f"the cloud router rejected the Hugging Face token (HTTP {code})",
                                      hint="set HF_TOKEN to a token allowed to call Inference Providers, "
                                           "or run `hf auth login`"), f"http_{code}")
        if code == 402:
            return tag(CloudCreditError("out of Inference Providers credit (HTTP 402)",
                                        hint=f"add credit at {_SETTINGS}/billing or bill an organisation "
                                             "with SMOLEDGE_BILL_TO"), "http_402")
        if code == 413:
            return tag(CloudModelError(f"{target}: the request is too large for it (HTTP 413: {detail})",
                                       hint="send fewer or smaller images"), "http_413", cools=False)
        if code in (400, 404, 422):
            return tag(CloudModelError(f"{target} is not served for this request (HTTP {code}: {detail})",
                                       hint="pick another model with SMOLEDGE_CLOUD_MODELS or enable a provider "
                                            f"at {_SETTINGS}/inference-providers"), f"http_{code}", cools=code == 404)
        if code == 429:
            return tag(CloudRateLimitError(f"{target} is rate limited (HTTP 429)",
                                           hint="wait a minute, or list alternative models"), "http_429", retry_after)
        if code >= 500:
            return tag(CloudUnavailableError(f"{target}: server error (HTTP {code})",
                                             hint="retry later, or list alternative models"),
                       f"http_{code}", retry_after)
        return tag(CloudError(f"{target}: the router refused the request (HTTP {code}: {detail})",
                              hint="check the request's size and parameters"), f"http_{code}", cools=False)

    def list_models(self, token: str | None, deadline: float | None = None) -> list[dict]:
        """``GET /models`` (model ids, providers, prices, context windows); raises CloudError on failure."""
        if token:
            self._check_secure()
        headers = auth_headers(token, None) if token else {}
        try:
            response = self._http.get(models_url(self.config.base_url), headers=headers,
                                      timeout=self._timeout(deadline, self.config.pricing_timeout_s))
        except (self._httpx.HTTPError, self._httpx.InvalidURL, self._httpx.StreamError) as err:
            raise tag(CloudUnavailableError(f"cannot list cloud models: {err.__class__.__name__}",
                                            hint="check the network"), "unreachable") from err
        if response.status_code >= 300:
            raise self._http_error(response, "/models")
        data = _loads(response.content, "/models")
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise _malformed("/models", "no data list")
        return models


class _Limit:
    """When one call must end (monotonic ``at``; ``code`` ``budget`` or ``timeout``), checked on every piece of
    bytes, and enforced by a watchdog that shuts the socket at ``at`` - so a stream that trickles and then
    stalls cannot outlast it (a read timeout only bounds each silence).  The socket comes from the
    transport's documented ``network_stream`` extension."""

    def __init__(self, at: float, code: str):
        self.at, self.code = at, code
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None

    @staticmethod
    def of(own: float, budget: float | None) -> _Limit:
        return _Limit(budget, "budget") if budget is not None and budget < own else _Limit(own, "timeout")

    def watch(self, response: Any) -> None:
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        self._sock = sock if isinstance(sock, socket.socket) else None
        self._arm()

    def rearm(self, other: _Limit) -> None:
        self.cancel()
        self.at, self.code = other.at, other.code
        self._arm()

    def _arm(self) -> None:
        if self._sock is not None:
            self._timer = threading.Timer(max(0.0, self.at - time.monotonic()), _cut, args=(self._sock,))
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def check(self, target: str) -> None:
        if time.monotonic() > self.at:
            raise self.error(target, "still streaming")

    def error(self, target: str, what: str) -> CloudError:
        limit = "the cloud time budget" if self.code == "budget" else "the call's total timeout"
        return tag(CloudUnavailableError(f"{target}: no complete answer within {limit} ({what})",
                                         hint="raise --deadline or SMOLEDGE_CLOUD_BUDGET_S, or ask for fewer tokens"),
                   self.code)


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read, which then fails and is mapped to the limit
    except OSError:
        pass


def _read_all(response: Any, record: CallRecord, limit: _Limit) -> bytes:
    parts = []
    for piece in response.iter_bytes():
        limit.check(record.target)
        parts.append(piece)
    return b"".join(parts)


def _sse_events(pieces: Iterator[bytes], record: CallRecord, limit: _Limit) -> Iterator[str]:
    """The data of each SSE event (``data:`` lines joined; comments and other fields skipped; LF or CRLF).

    An ``event: error`` event's data is yielded as is: ``_stream_event`` finds the error in it.  The time
    is checked on every piece of bytes, so a trickle cannot hold the call past ``limit``.
    """
    buffer, data = b"", []
    for piece in pieces:
        limit.check(record.target)
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if data:
                    yield "\n".join(data)
                data = []
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
    tail = buffer.rstrip(b"\r").decode("utf-8", "replace")
    if tail.startswith("data:"):
        data.append(tail[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def _stream_event(data: Any, record: CallRecord) -> tuple[StreamChunk | None, bool]:
    if not isinstance(data, dict):
        raise _malformed(record.target, "an event is not a JSON object")
    _read_usage(data, record)
    if data.get("error") is not None:
        raise _stream_error(data, record.target)
    choices = data.get("choices") or []
    if not choices:
        return None, False
    try:
        delta = choices[0].get("delta") or {}
        text = delta.get("content") or ""
        finish = _finish(choices[0].get("finish_reason"))
    except AttributeError as err:
        raise _malformed(record.target, "choices[0] is not an object") from err
    if not text and finish is None:
        return None, False
    return StreamChunk(text=text, finish_reason=finish), finish is not None


def _stream_error(data: dict, target: str) -> CloudError:
    """An error event inside a 200 stream (TGI's ``error_type``, or OpenAI's ``error.type``), by kind.

    validation: the request is wrong for this model (next target, no cooldown); overloaded: the provider
    refused before generating (retried); generation and anything else: next target.
    """
    err = data.get("error")
    kind = data.get("error_type") or (err.get("type") if isinstance(err, dict) else None)
    kind = kind if isinstance(kind, str) else ""
    if kind in ("validation", "invalid_request_error"):
        return tag(CloudModelError(f"{target} rejected the request mid-stream (validation error)",
                                   hint="check the request's size and parameters, or list alternative models"),
                   "stream_validation", cools=False)
    if kind in ("overloaded", "rate_limit_error"):
        return tag(CloudRateLimitError(f"{target} is overloaded (error inside the stream)",
                                       hint="wait a minute, or list alternative models"), "stream_overloaded")
    code = "stream_generation" if kind == "generation" else "stream_error"
    return tag(CloudUnavailableError(f"{target}: the provider failed mid-answer",
                                     hint="retry, or list alternative models"), code)


def _read_usage(data: dict, record: CallRecord) -> None:
    usage = data.get("usage")
    if isinstance(usage, dict):
        record.tokens_in = _int_or_none(usage.get("prompt_tokens"))
        record.tokens_out = _int_or_none(usage.get("completion_tokens"))


def _finish(reason: Any) -> str | None:
    """The finish reason as sent (``stop``, ``length``, ``content_filter``, ...); odd values read as ``stop``."""
    if reason is None:
        return None
    return reason if isinstance(reason, str) and _FINISH.fullmatch(reason) else "stop"


def _empty(target: str) -> CloudError:
    return tag(CloudProtocolError(f"{target}: the cloud router sent an empty answer (no text, no finish reason)",
                                  hint="retry; if it persists, pick another model with SMOLEDGE_CLOUD_MODELS"),
               "empty")


def _loads(data: str | bytes, target: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise _malformed(target, "invalid JSON") from err


def _malformed(target: str, what: str) -> CloudError:
    return tag(CloudProtocolError(f"{target}: malformed answer from the cloud router ({what})",
                                  hint="retry; if it persists, pick another model with SMOLEDGE_CLOUD_MODELS"),
               "malformed")


def _server_message(response: Any) -> str:
    """The server's error message, shortened; shown to the user, never written to the ledger."""
    try:
        data = json.loads(response.content)
        err = data.get("error", data) if isinstance(data, dict) else data
        text = err.get("message", err) if isinstance(err, dict) else err
    except (ValueError, UnicodeDecodeError):
        text = response.content.decode("utf-8", "replace")
    text = " ".join(str(text).split())
    return (text[:160] + "...") if len(text) > 160 else (text or "no details")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
