"""A runtime-only install (``pip install -e .``, no extras): every command that needs an extra stops with one
line naming it (``pip install -e '.[EXTRA]'``), a non-zero exit and no traceback, and a video never goes to
the cloud for want of PyAV.

The extras' packages are hidden from a fresh ``smoledge`` process by a ``sitecustomize`` on PYTHONPATH that
wraps the path finder: for those names it finds nothing, exactly as on a machine where they were never
installed (``importlib.util.find_spec`` returns None, ``import`` raises ModuleNotFoundError).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from test_video import make_clip

EXTRAS_PACKAGES = ("torch", "torchvision", "transformers", "onnx", "onnxscript", "onnx_ir", "accelerate", "gguf",
                   "peft", "executorch", "torchao", "coremltools", "av", "starlette", "uvicorn")

BLOCKER = textwrap.dedent(f"""\
    import sys
    from importlib.machinery import PathFinder

    HIDDEN = {set(EXTRAS_PACKAGES)!r}

    class RuntimeOnly(PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            return PathFinder.find_spec(name, path, target)

    sys.meta_path[:] = [RuntimeOnly if finder is PathFinder else finder for finder in sys.meta_path]
    """)


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory):
    """``runtime_only(*args)``: run ``smoledge ARGS`` with the extras' packages absent (a fresh cache dir, so
    nothing built earlier by the suite can stand in for them)."""
    root = tmp_path_factory.mktemp("runtime-only")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(root / "site"), "SMOLEDGE_CACHE_DIR": str(root / "cache"),
           "SMOLEDGE_NO_CLOUD": "1", "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "smoledge.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120, cwd=root)

    run.env = env
    return run


def test_the_blocker_hides_the_extras(runtime_only):
    res = subprocess.run([sys.executable, "-c", "import importlib.util as u; import smoledge.runtime; "
                          "print([n for n in ('torch', 'transformers', 'av', 'starlette') if u.find_spec(n)])"],
                         capture_output=True, text=True, env=runtime_only.env)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


def _one_line_error(res: subprocess.CompletedProcess, command: str, extra: str) -> str:
    assert res.returncode not in (0, 1), (res.returncode, res.stderr)  # 1 is Python's own traceback exit
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"smoledge {command}: error: "), lines[0]
    assert f"pip install -e '.[{extra}]'" in lines[0], lines[0]
    return lines[0]


def test_export_needs_the_export_extra(runtime_only, tmp_path):
    line = _one_line_error(runtime_only("export", str(tmp_path / "model"), "--out", str(tmp_path / "b")),
                           "export", "export")
    assert "(torch)" in line and not (tmp_path / "b").exists()


@pytest.mark.parametrize("flags", [(), ("--tiny",)], ids=["realtext", "tiny"])
def test_demo_model_needs_the_export_extra(runtime_only, flags):
    _one_line_error(runtime_only("demo-model", *flags), "demo-model", "export")


def test_run_on_a_checkpoint_needs_the_export_extra_and_says_what_else_to_do(runtime_only, tiny_model_dir):
    line = _one_line_error(runtime_only("run", str(tiny_model_dir), "hi"), "run", "export")
    assert line.startswith("smoledge run: error: running a checkpoint (it is exported first) needs the export "
                           "extra, which is not installed (torch)"), line
    assert "smoledge pull REPO_ID" in line  # run's own alternative, after the one install hint


def test_serve_needs_the_serve_extra(runtime_only, tiny_int4_bundle):
    line = _one_line_error(runtime_only("serve", str(tiny_int4_bundle), "--port", "0"), "serve", "serve")
    assert "(starlette)" in line


def test_video_needs_the_video_extra_and_stays_local(runtime_only, tiny_int4_bundle, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=8, fps=4)  # written here, where PyAV is installed
    res = runtime_only("run", str(tiny_int4_bundle), "--video", str(clip), "--prompt", "What happens?",
                       "--max-new-tokens", "4")
    line = _one_line_error(res, "run", "video")
    assert "PyAV" in line and "cloud:" not in line and res.stdout == ""
