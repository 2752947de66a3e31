"""Progress as a user sees it: ``smoledge demo-model`` and ``smoledge export`` under a real pseudo-terminal
never go 5 seconds without output (a ticker thread redraws the status line, so a slow, loaded machine
does not make this flaky); in a log there are no carriage-return frames but still a line per step; with
``--no-progress`` no bars at all, the libraries' included.

The silence measured runs from the start to the last output: the interpreter's own teardown after it
(seconds for torch under load) is not the command's work, and is reported, not asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pty_run import run_in_pty

REPO = Path(__file__).resolve().parents[1]
SILENCE_S = 5.0
SMOLEDGE = [sys.executable, "-m", "smoledge.cli"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "SMOLEDGE_CACHE_DIR": str(tmp_path / "cache")}


def _assert_never_silent(run) -> None:
    gap, before = run.longest_gap()
    print(f"longest silence {gap:.1f} s; exit {run.exit_after_output:.1f} s after the last output")
    assert gap < SILENCE_S, (f"{gap:.1f} s without output (the whole run took {run.seconds:.0f} s); "
                             f"the output before it: {before[-400:]!r}")


def _lines(text: str) -> list[str]:
    """What a terminal finally shows: each line's last carriage-return frame."""
    return [line.split("\r")[-1].rstrip() for line in text.replace("\r\n", "\n").split("\n")]


def test_demo_model_tiny_on_a_terminal_is_never_silent_for_5_seconds(tmp_path):
    run = run_in_pty([*SMOLEDGE, "demo-model", "--tiny"], env=_env(tmp_path), timeout=600)
    assert run.returncode == 0, run.text[-2000:]
    _assert_never_silent(run)
    built = tmp_path / "cache" / "models" / "tiny-smolvlm"
    lines = _lines(run.text)
    assert "demo-model: building the tiny random SmolVLM (2 vision + 2 text layers" in run.text
    assert any(line.startswith("demo-model: training the tokenizer (0:") for line in lines)
    assert any(line.startswith("demo-model: writing the model (0:") for line in lines)
    assert lines[-2:] == [str(built), ""] and (built / "config.json").is_file()

    again = run_in_pty([*SMOLEDGE, "demo-model", "--tiny"], env=_env(tmp_path), timeout=120)
    assert again.returncode == 0 and f"demo-model: {built} is already built (the tiny model)" in again.text


def test_demo_model_in_a_log_has_a_line_per_step_and_no_frames(tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.run([*SMOLEDGE, "demo-model", "--tiny"], env=_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=err, text=True, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert proc.stdout == f"{tmp_path / 'cache' / 'models' / 'tiny-smolvlm'}\n"  # the answer alone on stdout
    assert "\r" not in text
    ours = [line for line in text.splitlines() if line.startswith("demo-model")]
    assert ours[0].startswith("demo-model: building the tiny random SmolVLM")
    assert ours[1:4] == ["demo-model training the tokenizer", "demo-model building the model",
                         "demo-model writing the model"]
    assert ours[-1].startswith("demo-model: done in 0:")


@pytest.mark.slow
def test_export_on_a_terminal_is_never_silent_for_5_seconds(tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    # int4, not the calibrated default: the per-weight count below is onnxruntime's RTN quantizer's log
    run = run_in_pty([*SMOLEDGE, "export", str(tiny_model_dir), "--format", "onnx", "--quant", "int4",
                      "--out", str(out)], env=_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.text[-3000:]
    _assert_never_silent(run)
    lines = _lines(run.text)
    for graph in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        assert any(line.startswith(f"export: onnx: {graph} (0:") for line in lines), graph
    frames = run.text.split("\r")
    assert any("export [2/5] onnx: vision_encoder - tracing with torch.onnx - " in f for f in frames)
    assert any("export [4/5] onnx: decoder_model_merged - building the GroupQueryAttention graph - " in f
               for f in frames)
    counted = [re.search(r"decoder_model_merged - quantizing weights (\d+)/(\d+) - ", f) for f in frames]
    counted = [(int(m[1]), int(m[2])) for m in counted if m]
    assert counted and counted[-1][0] == counted[-1][1] > 10  # per weight, up to all of them
    assert lines[-3].startswith("export: done in ") and lines[-2] == str(out)
    assert "ETA" not in run.text and "step/s" not in run.text  # elapsed time, no estimate


@pytest.mark.slow
def test_export_no_progress_prints_no_bars(tiny_model_dir, tmp_path):
    pytest.importorskip("coremltools")  # the library whose own tqdm bars --no-progress must silence too
    out = tmp_path / "bundle"
    run = run_in_pty([*SMOLEDGE, "export", str(tiny_model_dir), "--format", "coreml", "--no-progress",
                      "--out", str(out)], env=_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.text[-3000:]
    assert "\r" not in run.text.replace("\r\n", "\n")  # not ours, not coremltools' tqdm frames
    assert "%|" not in run.text and "Running MIL" not in run.text and "Converting PyTorch" not in run.text
    assert not [line for line in _lines(run.text) if line.startswith("export")]  # no status, no step lines
    assert _lines(run.text)[-2] == str(out)


def test_a_video_run_says_what_it_decodes_before_the_first_token(tiny_fp32_bundle, tmp_path):
    pytest.importorskip("av")
    from test_video import make_clip

    clip = make_clip(tmp_path / "walk.mp4", frames=30, fps=10)  # 3 s at 1 fps: 3 frames
    args = ["run", str(tiny_fp32_bundle), "--video", str(clip), "--prompt", "What happens?", "--max-new-tokens", "6",
            "--temperature", "0"]
    line = "reading video walk.mp4 / encoding 3 frames (before the first token)"
    logged = subprocess.run([*SMOLEDGE, *args], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert logged.returncode == 0, logged.stderr
    assert line + "\n" in logged.stderr and "\r" not in logged.stderr and line not in logged.stdout
    answer = logged.stdout.strip()
    assert answer

    run = run_in_pty([*SMOLEDGE, *args, "--stream"], env=_env(tmp_path), timeout=300)
    assert run.returncode == 0, run.text[-2000:]
    shown = run.text.replace("\r\n", "\n")
    assert line + "\n" in shown and shown.index(line) < shown.index(answer)
    after = shown.split(line + "\n", 1)[1]
    assert _lines(after)[0].strip().startswith(answer[:10])  # the ticker's line is cleared before the answer

    text_only = subprocess.run([*SMOLEDGE, "run", str(tiny_fp32_bundle), "--prompt", "hi", "--max-new-tokens", "2"],
                               env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert text_only.returncode == 0 and "reading video" not in text_only.stderr
