"""Who may talk to ``smoledge serve``: ``Host``, ``Origin`` and content-type checks, as ASGI middleware.

A server on 127.0.0.1 without an API key is reachable by every web page the user opens: browsers
send ``text/plain`` and form posts cross-site without a CORS preflight, and a DNS-rebinding page
reaches it under a foreign ``Host``.  So, before any route runs:

* ``Host`` must name the bound address (for a loopback bind also ``localhost``), any IP literal
  when bound to a wildcard address, or a name given with ``--allow-host``: else 403;
* ``Origin``, when a browser sends one, must be the server's own (same-origin: its own page) or be
  on the ``--allow-origin`` list (none by default; ``*`` allows any): else 403.  Allowed
  cross-origin callers get CORS headers, and their preflight ``OPTIONS`` is answered;
* ``POST`` bodies on ``/v1/*`` must be ``application/json``: else 415 (no "simple" cross-site post).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.responses import JSONResponse, Response

WILDCARDS = {"0.0.0.0", "::", ""}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class AccessRules:
    bound_host: str = "127.0.0.1"
    allow_hosts: tuple[str, ...] = ()  # extra names for Host ("*": any)
    allow_origins: tuple[str, ...] = ()  # cross-origin callers ("*": any)
    names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = {h.lower().strip("[]") for h in self.allow_hosts} | {self.bound_host.lower().strip("[]")}
        if _is_loopback(self.bound_host):
            names |= _LOOPBACK_NAMES
        object.__setattr__(self, "names", frozenset(names))

    def host_ok(self, host: str) -> bool:
        name = _host_name(host)
        if name is None:
            return False
        if "*" in self.allow_hosts or name in self.names:
            return True
        return self.bound_host.strip("[]") in WILDCARDS and (_is_ip(name) or name == "localhost")

    def origin_ok(self, origin: str, host: str) -> bool:
        if origin in self.allow_origins or "*" in self.allow_origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()

    def cross_origin(self, origin: str, host: str) -> bool:
        return urlsplit(origin).netloc.lower() != host.lower()


class Guard:
    """ASGI middleware enforcing :class:`AccessRules` on every HTTP request."""

    def __init__(self, app, rules: AccessRules):
        self.app, self.rules = app, rules

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        origin, host = headers.get("origin"), headers.get("host", "")
        if origin is None or not self.rules.cross_origin(origin, host):
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS":
            return await Response(status_code=204, headers=_cors(origin, preflight=True))(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k.encode(), v.encode()) for k, v in _cors(origin).items())]}
            await send(message)

        return await self.app(scope, receive, send_with_cors)

    def _refusal(self, scope, headers: dict[str, str]) -> Response | None:
        host = headers.get("host", "")
        if not self.rules.host_ok(host):
            return _error(403, f"Host {host[:80]!r} is not this server's address; refused (DNS rebinding guard)",
                          "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.rules.origin_ok(origin, host):
            return _error(403, f"requests from the web page at {origin[:80]!r} are not allowed; start the server "
                               "with --allow-origin ORIGIN to allow it", "origin_not_allowed")
        if scope["path"].startswith("/v1/") and scope["method"] in ("POST", "PUT", "PATCH"):
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return _error(415, f"the request body must be application/json, not {kind or 'untyped'}",
                              "unsupported_media_type")
        return None


def _cors(origin: str, preflight: bool = False) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if preflight:
        headers.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                        "Access-Control-Allow-Headers": "authorization, content-type",
                        "Access-Control-Max-Age": "600"})
    return headers


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code,
                                   "param": None}}, status_code=status)


def _host_name(host: str) -> str | None:
    host = host.strip().lower()
    if not host:
        return None
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else None
    name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
    if port and not port.isdigit():
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
