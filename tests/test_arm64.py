"""The light runtime on an emulated Raspberry Pi 5 (arm64 Debian under qemu-user): scripts/check_arm64.sh
builds (and caches) the userland and runs the checks; each behaviour is asserted here from its results.

Outside CI the test skips when the machine cannot emulate (not root, no qemu-user-static / debootstrap,
no binfmt_misc, no archive); with CI=true the script turns that into a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "check_arm64.sh"
SKIPPED = 77


@pytest.fixture(scope="module")
def arm64_run(realtext_int4_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arm64")
    env = {**os.environ, "ARM64_OUT": str(out), "HOST_PY": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--bundle", str(realtext_int4_bundle)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode == SKIPPED:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    if not (out / "tampered.rc").exists():  # the checks never ran: a set-up failure
        pytest.fail(f"check_arm64.sh failed before its checks (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


def _read(out: Path, name: str) -> str:
    return (out / name).read_text()


@pytest.mark.slow
def test_runs_on_aarch64(arm64_run):
    machine, ort_version = _read(arm64_run, "machine.txt").split()
    import onnxruntime

    assert machine == "aarch64"
    assert ort_version == onnxruntime.__version__


@pytest.mark.slow
def test_paris_answer_is_byte_identical_to_x86(arm64_run):
    x86, arm64 = (arm64_run / "x86-answer.out").read_bytes(), (arm64_run / "arm64-answer.out").read_bytes()
    assert _read(arm64_run, "arm64-answer.rc").strip() == "0", _read(arm64_run, "arm64-answer.err")
    assert b"Paris" in x86
    assert arm64 == x86


@pytest.mark.slow
def test_bundle_verifies_on_arm64(arm64_run):
    assert _read(arm64_run, "verify.rc").strip() == "0", _read(arm64_run, "verify.err")


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [("corrupt-image", "image"), ("tampered", "sha256")])
def test_bad_input_is_a_one_line_error_on_arm64(arm64_run, case, words):
    err = _read(arm64_run, f"{case}.err")
    assert _read(arm64_run, f"{case}.rc").strip() not in ("", "0")
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert words in err.lower(), err


def test_script_fails_under_ci_when_a_tool_is_missing(tmp_path):
    """A PATH without qemu-aarch64-static: outside CI a skip (77) with the reason, under CI a failure."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "id", "renice", "dirname", "env"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found.startswith("/"):
            (bin_dir / tool).symlink_to(found)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PATH=str(bin_dir), HOST_PY=sys.executable)
    run = lambda: subprocess.run([str(bin_dir / "bash"), str(SCRIPT)], env=env, capture_output=True, text=True,
                                 timeout=60, cwd=tmp_path)
    proc = run()
    assert proc.returncode == SKIPPED, proc.stderr
    reason = "qemu-aarch64-static missing" if os.geteuid() == 0 else "needs root"
    assert f"skipped: {reason}" in proc.stderr
    env["CI"] = "true"
    proc = run()
    assert proc.returncode == 1
    assert "CI=true" in proc.stderr
