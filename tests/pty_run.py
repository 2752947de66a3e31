"""Run a command under a real pseudo-terminal and time its output: the longest silence tells whether a
long step shows progress (tests/test_progress_pty.py)."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class PtyRun:
    returncode: int
    chunks: tuple[tuple[float, str], ...]  # (seconds since start, text) as read from the terminal
    seconds: float  # start to exit

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.chunks)

    def longest_gap(self) -> tuple[float, str]:
        """The longest silence from the start to the last output (start -> first output, or between two
        outputs) and the text just before it."""
        marks = [(0.0, "<start>")] + list(self.chunks)
        gaps = [(b[0] - a[0], a[1]) for a, b in zip(marks, marks[1:])]
        return max(gaps, key=lambda g: g[0], default=(self.seconds, "<start>"))

    @property
    def exit_after_output(self) -> float:
        """Seconds from the last output to the process's exit (the interpreter's teardown)."""
        return self.seconds - (self.chunks[-1][0] if self.chunks else 0.0)


def run_in_pty(cmd: list[str], *, env: dict, timeout: float, columns: int = 120) -> PtyRun:
    """``cmd`` with stdin, stdout and stderr on one new pty of ``columns`` columns."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                            start_new_session=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            if time.monotonic() - start > timeout:
                proc.kill()
                raise TimeoutError(f"{cmd[:4]} ran past {timeout} s")
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the slave side has closed it
                break
            if not data:
                break
            chunks.append((time.monotonic() - start, data.decode("utf-8", "replace")))
        returncode = proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return PtyRun(returncode, tuple(chunks), time.monotonic() - start)
