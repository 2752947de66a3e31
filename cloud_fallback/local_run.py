"""Run a local engine's stream in a worker thread so the router can stop waiting at a deadline.

A blocking ``next()`` on the engine's iterator cannot be interrupted; the worker pumps chunks into a
queue and the caller waits on the queue with a timeout.  ``cancel()`` stops the pump at the next chunk
(the engine's step in flight still finishes: a backend cannot be interrupted mid-step).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from smoledge.runtime.types import ChatRequest, StreamChunk

from .engine import LocalEngine

_END = object()


class LocalTimeout(Exception):
    """The local engine sent nothing within the time asked for (internal: the router turns it into a deadline error)."""


class LocalRun:
    def __init__(self, engine: LocalEngine, request: ChatRequest):
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(engine, request), name="smoledge-local", daemon=True)
        self._thread.start()

    def _pump(self, engine: LocalEngine, request: ChatRequest) -> None:
        stream: Iterator[StreamChunk] | None = None
        try:
            stream = iter(engine.stream(request))
            for chunk in stream:
                if self._cancel.is_set():
                    break
                self._queue.put(chunk)
            self._queue.put(_END)
        except BaseException as err:  # handed to the caller's thread, whatever it is (MemoryError included)
            self._queue.put(err)
        finally:
            close = getattr(stream, "close", None)
            if self._cancel.is_set() and close is not None:
                close()

    def next(self, timeout: float | None) -> StreamChunk | None:
        """The next chunk, None at the end; re-raises the engine's exception; LocalTimeout after ``timeout`` s."""
        try:
            item = self._queue.get(timeout=None if timeout is None else max(0.0, timeout))
        except queue.Empty:
            raise LocalTimeout() from None
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._cancel.set()
