"""The runtime path (import + a full run) works with torch and transformers absent."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, synthetic_image

BLOCK = """
import sys
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'torchvision', 'accelerate', 'onnxscript'):
            raise ImportError(f'{name} is blocked: the runtime must not need it')
sys.meta_path.insert(0, _Blocker())
"""


def test_run_without_torch_or_transformers(tiny_int4_bundle, tmp_path):
    image = tmp_path / "img.png"
    synthetic_image(90, 60).save(image)
    code = BLOCK + f"""
from smoledge.cli import main
rc = main(['run', {str(tiny_int4_bundle)!r}, '--image', {str(image)!r}, '--prompt', 'What is it?',
           '--max-new-tokens', '8', '--stream'])
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules), 'torch was imported'
sys.exit(rc)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
