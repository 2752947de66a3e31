"""Progress of a long command on stderr: named steps, a detail inside a step, and a ticker thread.

On a terminal one status line is redrawn (carriage return) from a thread every half second, so a step
that gives no callbacks (torch's tracing, ExecuTorch's lowering) still shows its name, what it is doing
and how long it has run; nothing estimates the time left.  Each finished step stays above it as a line
with its duration.  Elsewhere (a pipe, a log file) there are no carriage returns: one line when a step
starts, a "still running" line every 30 s, and one at the end.  Disabled, nothing is printed.

The answer of a command goes to stdout; progress only ever goes to stderr (the stream it was given).
``set_postfix_str`` / ``update`` are the tqdm names the export targets call.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

SPINNER = "|/-\\"
TICK_S = 0.5  # the terminal line is redrawn at least this often
HEARTBEAT_S = 30.0  # a "still running" line this often when stderr is not a terminal


def elapsed(seconds: float) -> str:
    """``0:07``, ``2:05``, ``1:02:05``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """``with Progress("export", total=5) as p: p.step("loading model"); ...; p.advance()``.

    ``step(label)`` starts a step (ending the one before), ``detail(text)`` says what the step is doing
    now (``quantizing weights 12/84``), ``advance()`` counts a step done out of ``total``, ``write(line)``
    prints a line of its own.
    """

    def __init__(self, name: str, total: int | None = None, *, enabled: bool = True, stream: TextIO | None = None,
                 tty: bool | None = None, tick_s: float = TICK_S, heartbeat_s: float = HEARTBEAT_S,
                 summary: bool = True):
        self.name, self.total, self.enabled, self.summary = name, total, enabled, summary
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.tick_s, self.heartbeat_s = tick_s, heartbeat_s
        self.done, self.label, self._detail = 0, None, None
        self.started = self.step_started = self._last_line = time.monotonic()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frame, self._drawn = 0, 0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, name=f"progress-{self.name}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)

    def close(self, ok: bool = True) -> None:
        """Stop the ticker; on success print the step's and the command's times (unless ``summary`` is off),
        else only clear the status line so that the error starts at the left margin.  Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.enabled:
            return
        with self._lock:
            if ok and self.summary:
                self._finish_step()
                self._line(f"{self.name}: done in {elapsed(time.monotonic() - self.started)}")
            else:
                self._clear()
            self.label = None

    # ------------------------------------------------------------------ what the command reports

    def step(self, label: str) -> None:
        """Start the step ``label`` (the previous step is finished)."""
        with self._lock:
            if label == self.label:
                return
            self._finish_step()
            self.label, self._detail, self.step_started = label, None, time.monotonic()
            if self.enabled and not self.tty:
                self._line(f"{self.name}{self._count()} {label}")
            self._draw()

    def detail(self, text: str | None) -> None:
        """What the step is doing now; drawn at once on a terminal (callers report per weight or per
        tqdm refresh, a few times a second at most)."""
        with self._lock:
            if text != self._detail:
                self._detail = text
                if self.label is not None:
                    self._draw()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n

    def write(self, line: str) -> None:
        """A line of its own (above the status line on a terminal)."""
        if self.enabled:
            with self._lock:
                self._line(line)
                self._draw()

    def set_postfix_str(self, label: str, refresh: bool = True) -> None:  # the tqdm names the targets call
        self.step(label)

    def update(self, n: int = 1) -> None:
        self.advance(n)

    @contextlib.contextmanager
    def library_bars(self) -> Iterator[None]:
        """Route the tqdm bars libraries draw on ``sys.stderr`` (coremltools', transformers') into this
        progress's detail; other lines they print pass through.  Disabled, their bars are dropped."""
        sink = _BarSink(self)
        with contextlib.redirect_stderr(sink):
            try:
                yield
            finally:
                sink.flush_partial()
                self.detail(None)

    @contextlib.contextmanager
    def counting_logs(self, logger_name: str, prefix: str, what: str, names: set[str]) -> Iterator[None]:
        """Count the records of ``logger_name`` reading ``PREFIX NAME ...`` for each of ``names`` into the detail
        (``what 3/12``): onnxruntime's quantizer logs ``complete quantization of NODE`` per weight and offers no
        other callback.  The records enabled only for counting are dropped, so nothing new is printed."""
        logger = logging.getLogger(logger_name)
        counter = _LogCounter(self, prefix, what, names, logger.getEffectiveLevel())
        level = logger.level
        logger.addFilter(counter)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
        try:
            yield
        finally:
            logger.removeFilter(counter)
            logger.setLevel(level)

    # ------------------------------------------------------------------ drawing

    def _count(self) -> str:
        if not self.total:
            return ""
        return f" [{min(self.done + 1, self.total)}/{self.total}]"

    def status(self) -> str:
        """The status line: step, detail, elapsed time of the step and of the command."""
        now = time.monotonic()
        parts = [f"{self.name}{self._count()} {self.label or 'starting'}"]
        if self._detail:
            parts.append(self._detail)
        parts.append(f"{elapsed(now - self.step_started)} ({elapsed(now - self.started)} in all)")
        return " - ".join(parts)

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_s):
            with self._lock:
                if self.tty:
                    self._draw()
                elif time.monotonic() - self._last_line >= self.heartbeat_s:
                    self._line(f"{self.status()} - still running")

    def _draw(self) -> None:
        if not (self.enabled and self.tty):
            return
        self._frame += 1
        text = f"{SPINNER[self._frame % len(SPINNER)]} {self.status()}"[: _width(self.stream) - 1]
        self._emit("\r" + text.ljust(self._drawn))
        self._drawn = len(text)

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self._emit("\r" + " " * self._drawn + "\r")
            self._drawn = 0

    def _line(self, text: str) -> None:
        self._clear()
        self._emit(text + "\n")
        self._last_line = time.monotonic()

    def _finish_step(self) -> None:
        if self.label is not None and self.enabled and self.tty and self.summary:
            self._line(f"{self.name}: {self.label} ({elapsed(time.monotonic() - self.step_started)})")

    def _emit(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe or terminal: progress is not worth failing for
            self.enabled = False


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _width(stream) -> int:
    try:
        return max(os.get_terminal_size(stream.fileno()).columns, 20)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 80


def _len(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


# a tqdm frame: "DESC: 45%|####      | 5/11 [00:01<00:02, 3.1 passes/s]" or "DESC: 5 ops [00:01, ...]"
_BAR = re.compile(r"^(?P<desc>.*?):\s+(?:\d+%\|[^|]*\|\s*)?(?P<n>\d+)(?:/(?P<total>\d+))?[^\[|]*\[\d+:\d+")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _BarSink(io.TextIOBase):
    """A stand-in ``sys.stderr``: tqdm frames become the progress detail, other lines pass through."""

    def __init__(self, progress: Progress):
        self.progress, self.real, self._pending = progress, progress.stream, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *segments, self._pending = re.split(r"(\r|\n)", self._pending)
        for segment, end in zip(segments[::2], segments[1::2]):
            if not self._bar(segment) and end == "\n" and segment.strip():
                self._pass(segment)
        self._bar(self._pending)  # tqdm writes "\r" + frame: the frame so far is the bar's state now
        return len(text)

    def _bar(self, segment: str) -> bool:
        match = _BAR.match(_ANSI.sub("", segment).strip())
        if match:
            desc, n, total = match["desc"].strip(), match["n"], match["total"]
            self.progress.detail(f"{desc} {n}/{total}" if total else f"{desc} {n}")
        return match is not None

    def flush_partial(self) -> None:
        if self._pending.strip() and not _BAR.match(_ANSI.sub("", self._pending).strip()):
            self._pass(self._pending)
        self._pending = ""

    def _pass(self, line: str) -> None:
        if self.progress.enabled:
            self.progress.write(line)
        else:
            self.real.write(line + "\n")
            self.real.flush()

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")


class _LogCounter(logging.Filter):
    def __init__(self, progress: Progress, prefix: str, what: str, names: set[str], shown_from: int):
        super().__init__()
        self.progress, self.prefix, self.what, self.names, self.shown_from = progress, prefix, what, names, shown_from
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.levelno < logging.WARNING and message.startswith(self.prefix):
            name = message[len(self.prefix):].split(maxsplit=1)[:1]
            if name and name[0] in self.names and name[0] not in self.seen:
                self.seen.add(name[0])
                self.progress.detail(f"{self.what} {len(self.seen)}/{len(self.names)}")
        return record.levelno >= self.shown_from  # what was printed before still is; the rest was only counted


def first_token_wait(result, request, stream: TextIO | None = None) -> Progress:
    """For ``smoledge run``: a request with videos answered on this device says, on stderr, what it decodes
    and encodes before its first token, and shows the ticker while it does (on a terminal); close the
    returned progress when the first token arrives.  Other requests get a silent one."""
    frames = getattr(result.shape, "video_frames", 0) if result.decision.route == "local" else 0
    wait = Progress("run", enabled=bool(frames), stream=stream, summary=False)
    if frames:
        names = ", ".join(_source_name(v) for v in request.videos())
        wait.write(f"reading video {names} / encoding {frames} frames (before the first token)")
        if wait.tty:  # the ticker; a log already has its line
            wait.step(f"decoding and encoding {frames} video frames")
    return wait


def _source_name(source) -> str:
    return "(bytes)" if isinstance(source, (bytes, bytearray)) else os.path.basename(str(source))
