"""Connection-level defences of ``smoledge serve``: deadlines and a connection budget in the HTTP protocol.

uvicorn has no header timeout (its issue 157) and ASGI middleware only runs once the headers are in,
so these live in a subclass of uvicorn's h11 protocol, passed as ``uvicorn.Config(http=...)``:

* **header deadline**: a request line and headers must arrive within ``header_timeout_s`` of the
  connection opening (or of the previous response ending), or the connection gets 408 and is closed -
  slowloris clients cannot hold connections open by trickling bytes;
* **body deadline**: the body must arrive within ``body_timeout_s`` of the headers;
* **idle timeout**: uvicorn's keep-alive timeout (``idle_timeout_s``) closes idle connections;
* **connection budget**: at most ``max_connections`` open; over it, the oldest connection still
  waiting for its headers is closed to make room (so ``/health`` and real requests keep being
  answered while half-open connections pile up), and only if there is none is the new one refused.

Unlike uvicorn's ``limit_concurrency`` (which answers 503 to everything once the connections are
full), requests that got in are never refused here: admission to the model is the server's queue.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                     b"content-length: %d\r\n\r\n%s")
_TIMEOUT_BODY = (b'{"error": {"message": "the request did not arrive in time", "type": "invalid_request_error", '
                 b'"code": "request_timeout", "param": null}}')


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 5.0
    max_connections: int = 128


def protocol_class(limits: ConnectionLimits) -> type[H11Protocol]:
    """A protocol class for one server: its own budget and its own list of connections awaiting headers."""
    return type("SmolH11Protocol", (GuardedH11Protocol,), {"limits": limits, "awaiting": {}})


class GuardedH11Protocol(H11Protocol):
    limits: ConnectionLimits
    awaiting: dict  # connections waiting for their headers, oldest first (one dict per server)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._phase = "closed"
        self._wait_for_headers()
        if len(self.connections) > self.limits.max_connections:
            oldest = next((c for c in self.awaiting if c is not self), None)
            if oldest is not None:
                oldest.timed_out()
            else:  # every other connection is mid-request: this one cannot be served
                self.timed_out(respond=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_timer(None)
        self.awaiting.pop(self, None)
        self._phase = "closed"
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._phase != "headers":
            self._wait_for_headers()
            self._track()  # a pipelined request may be in already

    def _wait_for_headers(self) -> None:
        self._phase = "headers"
        self.awaiting[self] = True
        self._set_timer(self.limits.header_timeout_s)

    def _track(self) -> None:
        state = self.conn.their_state
        if self._phase == "headers" and state is not h11.IDLE:
            self.awaiting.pop(self, None)
            self._phase = "body" if state is h11.SEND_BODY else "busy"
            self._set_timer(self.limits.body_timeout_s if self._phase == "body" else None)
        if self._phase == "body" and state is not h11.SEND_BODY:
            self._phase = "busy"
            self._set_timer(None)

    def _set_timer(self, seconds: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if seconds is None else self.loop.call_later(seconds, self.timed_out)

    def timed_out(self, respond: bool = True) -> None:
        """Close this connection (a 408 first when it is between requests, so the client knows why)."""
        self._set_timer(None)
        self.awaiting.pop(self, None)
        if self.transport.is_closing():
            return
        if respond and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(_TIMEOUT_RESPONSE % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
        self.transport.close()
