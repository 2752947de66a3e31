"""The OpenAI chat-completions wire format of ``smoledge serve``, as pure functions: no web stack, no I/O.

``parse_chat(body, limits, ...)`` turns a request body into a :class:`ParsedChat` (a ``ChatRequest`` plus
the response options) or raises :class:`ApiError` naming the field that is wrong;
``completion``, ``chunk`` and ``usage_chunk`` build the response objects.  Images are resolved by
:mod:`smoledge.runtime.server_images`; errors are :mod:`smoledge.runtime.server_errors`.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from smoledge.errors import ParameterError
from smoledge.redact import redact
from smoledge.runtime.request_check import check_request
from smoledge.runtime.server_errors import bad
from smoledge.runtime.server_images import ImageLimits, resolve_image
from smoledge.runtime.types import ChatRequest, ImagePart, Message, SamplingConfig, TextPart

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4
MAX_JSON_DEPTH = 64  # a chat request nests about 6 deep; 100,000 would exhaust the parser's stack
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))


@dataclass(frozen=True)
class ParsedChat:
    request: ChatRequest
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False  # counted here (cloud route), not reported by the engine

    def to_json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class Route:
    """Where a request ran and why (the router's final decision)."""

    route: str
    code: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"route": self.route, "code": self.code, "reason": redact(self.reason)}

    def headers(self) -> dict[str, str]:
        reason = redact(self.reason).encode("ascii", "replace").decode("ascii")[:500]
        return {"x-smoledge-route": self.route, "x-smoledge-route-code": self.code, "x-smoledge-route-reason": reason}


# --------------------------------------------------------------------------------------------- requests


def parse_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    depth = json_depth(body)
    if depth > max_depth:
        raise bad(f"the request body nests {depth} levels deep, over this server's limit of {max_depth}",
                  code="json_too_deep")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad(f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in ``body`` (strings skipped), without parsing it."""
    import numpy as np

    skeleton = _JSON_STRING.sub(b"", body)
    depth, deepest = 0, 0
    for start in range(0, len(skeleton), 1 << 20):
        piece = np.frombuffer(skeleton[start:start + (1 << 20)], dtype=np.uint8)
        step = np.isin(piece, _OPEN).astype(np.int32) - np.isin(piece, _CLOSE).astype(np.int32)
        if len(step):
            levels = depth + np.cumsum(step)
            deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def parse_chat(body: bytes, limits: ImageLimits, *, default_max_tokens: int, fetcher=None,
               max_depth: int = MAX_JSON_DEPTH, defaults: SamplingConfig = SamplingConfig()) -> ParsedChat:
    """Validate a ``/v1/chat/completions`` body; decode and check its images (blocking: run in a thread).
    ``defaults``: the sampling where the request is silent (`smoledge serve`: the checkpoint's
    generation_config, else OpenAI's temperature 1 / top_p 1; top-k and the repetition penalty, which the
    OpenAI API has no parameter for, come from it only)."""
    data = parse_json(body, max_depth)
    _refuse_unsupported(data)
    messages = _messages(data.get("messages"), limits, fetcher)
    stream = _typed(data, "stream", bool, False)
    options = _typed(data, "stream_options", dict, None) or {}
    include_usage = _typed(options, "include_usage", bool, False, "stream_options.include_usage")
    model = _typed(data, "model", str, None)
    request = ChatRequest(messages, _sampling(data, default_max_tokens, defaults))
    try:
        check_request(request)  # the checks `smoledge run` makes too (seed range, UTF-8, ...)
    except ParameterError as err:
        raise bad(err.one_line(), err.param) from None
    return ParsedChat(request, stream, include_usage, model)


def _refuse_unsupported(data: dict[str, Any]) -> None:
    n = data.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise bad(f"n must be 1 (one choice per request), got {n!r}", "n")
    if data.get("tools") or data.get("functions"):
        raise bad("tools / function calling are not supported by this server", "tools", "unsupported_parameter")
    fmt = data.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("only response_format {'type': 'text'} is supported", "response_format", "unsupported_parameter")
    if data.get("logprobs"):
        raise bad("logprobs are not supported by this server", "logprobs", "unsupported_parameter")


def _typed(data: dict[str, Any], key: str, kind: type, default: Any, param: str | None = None) -> Any:
    value = data.get(key)
    if value is None:
        return default
    if type(value) is not kind:
        raise bad(f"{param or key} must be {_kind_name(kind)}, got {_json_type(value)}", param or key, "invalid_type")
    return value


def _number(data: dict[str, Any], key: str, default: float, low: float, high: float, *,
            open_low: bool = False) -> float:
    value = data.get(key)
    if value is None:
        return default
    if type(value) not in (int, float) or not math.isfinite(value):
        raise bad(f"{key} must be a number, got {_json_type(value)}", key, "invalid_type")
    if value > high or value < low or (open_low and value == low):
        side = "(" if open_low else "["
        raise bad(f"{key} must be in {side}{low:g}, {high:g}], got {value}", key)
    return float(value)


def _sampling(data: dict[str, Any], default_max_tokens: int, defaults: SamplingConfig) -> SamplingConfig:
    max_tokens = data.get("max_completion_tokens")
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = data.get("max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif type(max_tokens) is not int:
        raise bad(f"{key} must be an integer, got {_json_type(max_tokens)}", key, "invalid_type")
    elif max_tokens < 1:
        raise bad(f"{key} must be at least 1, got {max_tokens}", key)
    seed = data.get("seed")
    if seed is not None and type(seed) is not int:
        raise bad(f"seed must be an integer, got {_json_type(seed)}", "seed", "invalid_type")
    temperature = _number(data, "temperature", defaults.temperature, 0.0, 2.0)
    return SamplingConfig(max_new_tokens=max_tokens, temperature=temperature,
                          top_p=_number(data, "top_p", defaults.top_p, 0.0, 1.0, open_low=True), top_k=defaults.top_k,
                          repetition_penalty=defaults.repetition_penalty, seed=seed, stop=_stop(data))


def _stop(data: dict[str, Any]) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad("stop must be a non-empty string or a list of them", "stop", "invalid_type")
    if len(items) > MAX_STOP:
        raise bad(f"stop takes at most {MAX_STOP} strings, got {len(items)}", "stop")
    return tuple(items)


def _messages(raw: Any, limits: ImageLimits, fetcher) -> tuple[Message, ...]:
    if raw is None:
        raise bad("messages is required", "messages", "missing_required_parameter")
    if not isinstance(raw, list):
        raise bad(f"messages must be an array, got {_json_type(raw)}", "messages", "invalid_type")
    if not raw:
        raise bad("messages must not be empty", "messages", "empty_array")
    budget = _ImageBudget(limits.max_images)
    return tuple(_message(m, f"messages[{i}]", limits, fetcher, budget) for i, m in enumerate(raw))


@dataclass
class _ImageBudget:
    left: int


def _message(raw: Any, where: str, limits: ImageLimits, fetcher, budget: _ImageBudget) -> Message:
    if not isinstance(raw, dict):
        raise bad(f"{where} must be an object, got {_json_type(raw)}", where, "invalid_type")
    role = raw.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise bad(f"{where}.role {role!r} is not supported; use system, developer, user or assistant",
                  f"{where}.role", "invalid_role")
    content = raw.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return Message(ROLES[role], (TextPart(content),))
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or an array of parts, got {_json_type(content)}",
                  f"{where}.content", "invalid_type")
    parts = tuple(_part(p, f"{where}.content[{j}]", role, limits, fetcher, budget) for j, p in enumerate(content))
    return Message(ROLES[role], parts)


def _part(raw: Any, where: str, role: str, limits: ImageLimits, fetcher, budget: _ImageBudget):
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        text = raw.get("text")
        if not isinstance(text, str):
            raise bad(f"{where}.text must be a string, got {_json_type(text)}", f"{where}.text", "invalid_type")
        return TextPart(text)
    if kind == "image_url":
        if role != "user":
            raise bad(f"{where}: images are only allowed in user messages", where, "invalid_image_url")
        budget.left -= 1
        if budget.left < 0:
            raise bad(f"{where}: at most {limits.max_images} images per request", where, "too_many_images")
        image = raw.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise bad(f"{where}.image_url.url must be a string", f"{where}.image_url.url", "invalid_type")
        return ImagePart(resolve_image(url, limits, where=f"{where}.image_url.url", fetcher=fetcher))
    if not isinstance(raw, dict):
        raise bad(f"{where} must be an object, got {_json_type(raw)}", where, "invalid_type")
    raise bad(f"{where}.type {kind!r} is not supported; use text or image_url", f"{where}.type", "unsupported_content")


def _kind_name(kind: type) -> str:
    return {bool: "a boolean", str: "a string", dict: "an object", int: "an integer"}.get(kind, kind.__name__)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------- responses


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, text: str, finish: str | None, usage: Usage, route: Route) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish or "stop", "logprobs": None}],
            "usage": usage.to_json(), "smoledge": {**route.to_json(), "usage_estimated": usage.estimated}}


def chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None,
          route: Route | None = None) -> dict[str, Any]:
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if route is not None:
        out["smoledge"] = route.to_json()
    return out


def usage_chunk(cid: str, model: str, usage: Usage) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage.to_json()}


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
