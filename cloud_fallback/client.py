"""The one place that talks HTTP: the router's OpenAI-compatible ``/chat/completions`` and ``/models``.

Why not ``huggingface_hub.InferenceClient.chat_completion``: it returns parsed chunks only, so the
``x-inference-provider`` response header (which provider served the call: the ledger's provider and
price) is lost; it has one timeout for connect and read alike and no total; a streamed response stays
open on the client's exit stack until the client is closed; it has no ``/models`` (pricing) call; and
with ``HF_DEBUG`` its shared session logs request bodies, i.e. prompts.  So this module speaks the
same API with ``httpx2`` (the HTTP library huggingface_hub itself uses), and huggingface_hub is used
for what it is best at: finding the token (``HF_TOKEN`` or the ``hf auth login`` file).

Every failure is raised as a :mod:`smoledge.errors` cloud error with two extra attributes the
failover loop reads: ``status`` (a short tag for the ledger, e.g. ``http_429``) and ``retry_after``
(seconds from a Retry-After header, or None).
"""

from __future__ import annotations

import json
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


def tag(err: CloudError, status: str, retry_after: float | None = None) -> CloudError:
    err.status = status  # type: ignore[attr-defined]
    err.retry_after = retry_after  # type: ignore[attr-defined]
    return err


class RouterClient:
    """HTTP to one router base URL.  Use as a context manager, or call ``close()``."""

    def __init__(self, config: CloudConfig):
        import httpx2

        self._httpx = httpx2
        self.config = config
        self._host = urlparse(config.base_url).netloc or config.base_url
        self._http = httpx2.Client(
            timeout=httpx2.Timeout(connect=config.connect_timeout_s, read=config.read_timeout_s,
                                   write=config.read_timeout_s, pool=config.connect_timeout_s),
            follow_redirects=False,
        )

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def stream_chat(self, call: HttpCall, record: CallRecord) -> Iterator[StreamChunk]:
        """POST ``call`` and yield the answer's text chunks; fills ``record`` as it goes."""
        started = time.monotonic()
        try:
            with self._http.stream(call.method, call.url, headers=call.headers, json=call.json) as response:
                record.provider = response.headers.get("x-inference-provider") or record.provider
                if response.status_code >= 400:
                    response.read()
                    raise self._http_error(response, record.target)
                yield from self._read_answer(response, record, started)
            record.status = "ok"
        except self._httpx.TransportError as err:
            raise self._transport_error(err, record.target) from err
        finally:
            record.latency_s = time.monotonic() - started

    def _transport_error(self, err: Exception, target: str) -> CloudError:
        name = type(err).__name__
        if isinstance(err, self._httpx.TimeoutException):
            return tag(CloudUnavailableError(f"{target}: no answer from {self._host} in time ({name})",
                                             hint="check the network, or raise CloudConfig.read_timeout_s"), "timeout")
        if isinstance(err, self._httpx.RemoteProtocolError):
            return tag(CloudUnavailableError(f"{target}: connection to {self._host} dropped mid-answer",
                                             hint="retry; check the network"), "dropped")
        return tag(CloudUnavailableError(f"cannot reach the cloud router at {self._host}: {name}",
                                         hint="check the network and SMOLEDGE_CLOUD_BASE_URL"), "unreachable")

    def _read_answer(self, response: Any, record: CallRecord, started: float) -> Iterator[StreamChunk]:
        content_type = response.headers.get("content-type", "")
        if "text/event-stream" not in content_type:  # a server that ignored stream=true
            response.read()
            yield from self._whole_answer(response.content, record)
            return
        finished = False
        for line in response.iter_lines():
            if time.monotonic() - started > self.config.total_timeout_s:
                raise tag(CloudUnavailableError(
                    f"{record.target}: answer took over {self.config.total_timeout_s:g} s",
                    hint="raise CloudConfig.total_timeout_s or ask for fewer tokens"), "timeout")
            event = _sse_data(line)
            if event is None:
                continue
            if event == "[DONE]":
                finished = True
                break
            chunk, done = _stream_event(_loads(event, record.target), record)
            finished = finished or done
            if chunk is not None:
                yield chunk
        if not finished:
            raise tag(CloudUnavailableError(f"{record.target}: the answer stream ended before it was complete",
                                            hint="retry; check the network"), "dropped")

    def _whole_answer(self, body: bytes, record: CallRecord) -> Iterator[StreamChunk]:
        data = _loads(body, record.target)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise _malformed(record.target, "no choices[0].message") from err
        _read_usage(data, record)
        yield StreamChunk(text=text, finish_reason=_finish(choice.get("finish_reason")) or "stop")

    def _http_error(self, response: Any, target: str) -> CloudError:
        code = response.status_code
        detail = _server_message(response)
        retry_after = parse_retry_after(response.headers.get("retry-after"), now=time.time())
        if code in (401, 403):
            return tag(CloudAuthError(f"the cloud router rejected the Hugging Face token (HTTP {code})",
                                      hint="set HF_TOKEN to a token allowed to call Inference Providers, "
                                           "or run `hf auth login`"), f"http_{code}")
        if code == 402:
            return tag(CloudCreditError("out of Inference Providers credit (HTTP 402)",
                                        hint=f"add credit at {_SETTINGS}/billing or bill an organisation "
                                             "with SMOLEDGE_BILL_TO"), "http_402")
        if code in (400, 404, 422):
            return tag(CloudModelError(f"{target} is not served for this request (HTTP {code}: {detail})",
                                       hint="pick another model with SMOLEDGE_CLOUD_MODELS or enable a provider "
                                            f"at {_SETTINGS}/inference-providers"), f"http_{code}")
        if code == 429:
            return tag(CloudRateLimitError(f"{target} is rate limited (HTTP 429)",
                                           hint="wait a minute, or list alternative models"), "http_429", retry_after)
        if code >= 500:
            return tag(CloudUnavailableError(f"{target}: server error (HTTP {code})",
                                             hint="retry later, or list alternative models"),
                       f"http_{code}", retry_after)
        return tag(CloudError(f"{target}: the router refused the request (HTTP {code}: {detail})",
                              hint="check the request's size and parameters"), f"http_{code}")

    def list_models(self, token: str | None) -> list[dict]:
        """``GET /models`` (model ids, providers, per-million-token prices); raises CloudError on failure."""
        headers = auth_headers(token, None) if token else {}
        try:
            response = self._http.get(models_url(self.config.base_url), headers=headers,
                                      timeout=self.config.pricing_timeout_s)
        except self._httpx.HTTPError as err:
            raise tag(CloudUnavailableError(f"cannot list cloud models: {err.__class__.__name__}",
                                            hint="check the network"), "unreachable") from err
        if response.status_code >= 400:
            raise self._http_error(response, "/models")
        data = _loads(response.content, "/models")
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise _malformed("/models", "no data list")
        return models


def _sse_data(line: str) -> str | None:
    """The payload of an SSE ``data:`` line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _stream_event(data: Any, record: CallRecord) -> tuple[StreamChunk | None, bool]:
    if not isinstance(data, dict):
        raise _malformed(record.target, "an event is not a JSON object")
    if data.get("error") is not None:
        raise tag(CloudUnavailableError(f"{record.target}: the provider failed mid-answer",
                                        hint="retry, or list alternative models"), "stream_error")
    _read_usage(data, record)
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


def _read_usage(data: dict, record: CallRecord) -> None:
    usage = data.get("usage")
    if isinstance(usage, dict):
        record.tokens_in = _int_or_none(usage.get("prompt_tokens"))
        record.tokens_out = _int_or_none(usage.get("completion_tokens"))


def _finish(reason: Any) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


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
