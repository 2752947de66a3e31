"""A missing optional package never routes to the cloud (18 #8): with PyAV blocked, a token set and the cloud
allowed, `smoledge run --video` is a one-line install hint and the fake router on 127.0.0.1 sees nothing."""

from __future__ import annotations

import os

from conftest import run_cli
from test_cloud_fakes import TOKEN, router  # noqa: F401

BLOCKER = '''
import sys


class _NoPyAV:
    """As if PyAV were not installed: every import of av fails."""

    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith("av."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoPyAV())
'''


def test_video_without_pyav_is_an_install_hint_and_uploads_nothing(tiny_int4_bundle, tmp_path, router):  # noqa: F811
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
           "HF_TOKEN": TOKEN, "SMOLEDGE_CLOUD_BASE_URL": router.url, "SMOLEDGE_NO_CLOUD": "0",
           "SMOLEDGE_CACHE_DIR": str(tmp_path / "cache")}
    done = run_cli("run", str(tiny_int4_bundle), "--video", str(clip), "--prompt", "What happens?", env=env,
                   timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs PyAV" in lines[0] and "pip install -e '.[video]'" in lines[0], done.stderr
    assert router.requests == []  # not a chat call, not even the /models listing
    assert TOKEN not in done.stderr + done.stdout
