"""smoledge.progress on its own: a terminal gets a status line redrawn by a thread (never a frozen line,
never an ETA), a log gets one line per step and no carriage returns, disabled prints nothing, and the
libraries' tqdm bars and onnxruntime's per-weight log records feed the detail."""

from __future__ import annotations

import io
import logging
import os
import sys
import time

import pytest

from smoledge.progress import Progress


def _read_all(fd: int) -> str:
    import select

    out = b""
    while select.select([fd], [], [], 0.05)[0]:
        out += os.read(fd, 65536)
    return out.decode()


@pytest.fixture
def terminal():
    """A real pty: the slave end as a text stream (isatty() is true) and a reader of what it printed."""
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    stream = open(slave, "w", buffering=1, encoding="utf-8")
    yield stream, lambda: _read_all(master).replace("\r\n", "\n")  # the tty's own newline translation
    stream.close()
    os.close(master)


def test_a_terminal_gets_a_status_line_redrawn_while_the_step_gives_no_news(terminal):
    stream, read = terminal
    with Progress("export", total=3, stream=stream, tick_s=0.1) as progress:
        assert progress.tty
        progress.step("executorch: lower to XNNPACK")
        time.sleep(0.65)  # a library call that reports nothing
        progress.advance()
        progress.step("writing bundle")
    text = read()
    frames = [f for f in text.split("\r") if "lower to XNNPACK" in f and "in all)" in f]
    assert len(frames) >= 4, text  # redrawn by the thread, about every tick
    assert "export [1/3] executorch: lower to XNNPACK - 0:00 (0:00 in all)" in text
    assert "export: executorch: lower to XNNPACK (0:00)\n" in text  # the finished step stays as a line
    assert text.rstrip().endswith("export: done in 0:00")
    assert "ETA" not in text and "<" not in text  # elapsed time only, no estimate of what is left


def test_a_log_gets_a_line_per_step_a_heartbeat_and_no_carriage_returns():
    log = io.StringIO()
    with Progress("export", total=2, stream=log, tick_s=0.05, heartbeat_s=0.3) as progress:
        assert not progress.tty
        progress.step("loading model")
        progress.detail("reading the weights")
        progress.advance()
        progress.step("onnx: decoder_model_merged")
        progress.detail("tracing with torch.onnx")
        time.sleep(0.5)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "export [1/2] loading model"
    assert lines[1] == "export [2/2] onnx: decoder_model_merged"
    assert any(line.startswith("export [2/2] onnx: decoder_model_merged - tracing with torch.onnx - 0:00")
               and line.endswith("still running") for line in lines[2:-1])
    assert lines[-1] == "export: done in 0:00"
    assert "reading the weights" not in log.getvalue()  # details are for the status line (and heartbeats)


def test_disabled_prints_nothing_and_drops_library_bars_but_not_their_messages():
    from tqdm import tqdm

    out = io.StringIO()
    with Progress("export", stream=out, enabled=False) as progress:
        progress.step("coreml: decoder")
        with progress.library_bars():
            for _ in tqdm(range(5), desc="Converting PyTorch Frontend ==> MIL Ops", unit=" ops"):
                pass
            print("a real message from a library", file=sys.stderr)
    assert out.getvalue() == "a real message from a library\n"


def test_library_bars_feed_the_detail_line():
    from tqdm import tqdm

    out = io.StringIO()
    with Progress("export", stream=out, tick_s=60) as progress:
        progress.step("coreml: decoder")
        with progress.library_bars():
            for i in tqdm(range(7), desc="Running MIL default pipeline", unit=" passes", mininterval=0):
                if i == 3:  # the bar's latest frame, not the one before it
                    assert progress._detail == "Running MIL default pipeline 3/7"
            assert progress._detail == "Running MIL default pipeline 7/7"
            for _ in tqdm(iter(range(3)), desc="Converting PyTorch Frontend ==> MIL Ops", mininterval=0):
                pass
            assert progress._detail == "Converting PyTorch Frontend ==> MIL Ops 3"
            for _ in tqdm([], desc="Running MIL frontend_milinternal pipeline", unit=" passes"):
                pass  # coremltools' empty pipeline: "...: 0 passes [00:00, ? passes/s]"
            assert progress._detail == "Running MIL frontend_milinternal pipeline 0"
            print("kept", file=sys.stderr)
    assert "kept\n" in out.getvalue() and "Running MIL" not in out.getvalue()


def test_counting_logs_counts_each_weight_and_prints_nothing_new():
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("smoledge.test.quantizer")
    logger.propagate, handler = False, Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR)  # as `smoledge export` quiets onnxruntime
    try:
        with Progress("export", stream=io.StringIO(), tick_s=60) as progress:
            with progress.counting_logs(logger.name, "complete quantization of", "quantizing weights",
                                        {"/layers.0/q_proj", "/layers.0/k_proj"}):
                logger.info("start to quantize /layers.0/q_proj ...")
                logger.info("complete quantization of /layers.0/q_proj with 4 bits ...")
                logger.info("complete quantization of /layers.0/attn_matmul with 4 bits ...")  # not a weight
                assert progress._detail == "quantizing weights 1/2"
                logger.info("complete quantization of /layers.0/k_proj with 4 bits ...")
                assert progress._detail == "quantizing weights 2/2"
                logger.error("a real error")
        assert logger.level == logging.ERROR
        assert seen == ["a real error"]
    finally:
        logger.removeHandler(handler)


def test_a_closed_stream_never_fails_the_command():
    stream = io.StringIO()
    with Progress("export", stream=stream, tick_s=0.05) as progress:
        stream.close()
        progress.step("loading model")
        time.sleep(0.1)
    assert not progress.enabled
