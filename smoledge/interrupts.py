"""Ctrl-C that ends a command cleanly (exit 130, no ``terminate called without an active exception``).

Python raises :class:`KeyboardInterrupt` in the main thread at whatever bytecode runs when SIGINT arrives.
Meanwhile onnxruntime (or ExecuTorch, torch) may be running a step on another thread - ``smoledge run``
decodes in the router's worker thread - and an interpreter that exits under a thread inside native code
tears the C++ runtime down beneath it: ``std::terminate``, ``Aborted``, exit 134.

So a long command runs inside :func:`deferred`: its SIGINT handler only records the request, and the
generation loops call :func:`check` between decoder steps (on any thread), which raises
``KeyboardInterrupt`` there, where no native frame is on the stack.  The exception travels the ordinary way
(a worker thread hands it to the caller), finally blocks clean up (an export's staging folder), and
``smoledge.cli`` prints the message and returns 130.  A second Ctrl-C raises at once: the way out of a
step that never returns.  Every command runs inside :func:`recorded`, so an interrupt that a library turns
into another error still exits 130.  Outside :func:`deferred` (the server, where uvicorn owns SIGINT; library use)
:func:`check` does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

_requested = threading.Event()


def requested() -> bool:
    """Whether Ctrl-C was pressed inside :func:`deferred` and not acted on yet."""
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed; call it between steps of native work."""
    if _requested.is_set():
        raise KeyboardInterrupt


def _handler(signum, frame) -> None:
    if _requested.is_set():  # the second Ctrl-C: stop now, whatever runs
        raise KeyboardInterrupt
    _requested.set()


def _record_and_raise(signum, frame) -> None:
    _requested.set()
    raise KeyboardInterrupt


_depth = 0  # nested blocks; the outermost one clears the request when it ends


@contextlib.contextmanager
def _installed(handler) -> Iterator[None]:
    global _depth
    previous = signal.signal(signal.SIGINT, handler)
    _depth += 1
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _depth -= 1
        if _depth == 0:
            _requested.clear()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def recorded() -> Iterator[None]:
    """Run the block with Ctrl-C raising KeyboardInterrupt as usual, and remembered (:func:`requested`): a
    library that turns the interrupt into an error of its own (an import cut short inside torch's ONNX export
    becomes ``ImportError: initialization failed``) still ends as an interrupt.  ``smoledge.cli`` wraps every
    command in it."""
    if not _main_thread():
        yield
        return
    with _installed(_record_and_raise):
        yield


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Run the block with SIGINT recorded instead of raised; raises KeyboardInterrupt at the end of the block
    if Ctrl-C came after the last :func:`check`.  Nested or off the main thread it only runs the block."""
    if not _main_thread() or signal.getsignal(signal.SIGINT) is _handler:
        yield
        return
    with _installed(_handler):
        yield
        check()


def end_line(stream=None) -> None:
    """Finish a partly printed line on ``stream`` (stdout) so the interrupt message starts a line of its own."""
    stream = stream or sys.stdout
    try:
        stream.write("\n")
        stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing to finish
        pass
