"""An interrupted export leaves no folder that looks like a valid bundle, and an existing bundle stays
intact until the new one is complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from smoledge.errors import BundleError
from smoledge.runtime.bundle import open_bundle


def _start_export(model_dir, out, recipe="fp32"):
    return subprocess.Popen([sys.executable, "-m", "smoledge.cli", "export", str(model_dir), "--quant", recipe,
                             "--out", str(out), "--no-progress"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _kill_when_staging_has_files(proc, parent, name, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        staged = [p for p in parent.glob(f".{name}.staging-*") if any(p.rglob("*.onnx*"))]
        if staged:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return staged[0]
        if proc.poll() is not None:
            pytest.fail(f"export ended before it could be interrupted: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("export never wrote a graph into its staging folder")


def test_killed_export_leaves_no_bundle(tiny_model_dir, tmp_path):
    out = tmp_path / "bundle"
    proc = _start_export(tiny_model_dir, out)
    _kill_when_staging_has_files(proc, tmp_path, "bundle")
    assert not out.exists()
    with pytest.raises(BundleError):
        open_bundle(out)


def test_killed_re_export_keeps_the_old_bundle(tiny_model_dir, tiny_int4_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_int4_bundle, out)
    before = json.loads((out / "manifest.json").read_text())
    proc = _start_export(tiny_model_dir, out, recipe="fp32")
    _kill_when_staging_has_files(proc, tmp_path, "bundle")
    bundle = open_bundle(out)
    bundle.verify(full=True)
    assert bundle.manifest.to_dict()["files"] == before["files"]


def test_export_refuses_a_foreign_folder(tiny_model_dir, tmp_path, export_bundle_to):
    from smoledge.errors import ExportError

    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"keep me")
    with pytest.raises(ExportError, match="not a smoledge bundle"):
        export_bundle_to(tiny_model_dir, out, "fp32")
    assert (out / "holiday.jpg").read_bytes() == b"keep me"
