"""The TypeScript runtime (runtime/js) against the Python one: this test writes the shared vectors from the
Python runtime (runtime/js/python/vectors.py: odd images, prompt ids, greedy tokens of the tiny bundle, errors,
and the real-text INT4 bundle for the Paris question), then runs the JS suite with Node's test runner, which
compares against them (and runs the browser page in headless Chromium).

Needs Node 20 with ``npm ci`` done in runtime/js, and Debian's ``chromium`` for the browser test. Without them
the test is skipped, except under ``CI=true``, where a missing dependency fails it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JS = REPO / "runtime" / "js"
sys.path.insert(0, str(JS / "python"))


def _missing_node_deps() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node / npm not installed"
    if not (JS / "node_modules" / "onnxruntime-node").is_dir():
        return "runtime/js has no node_modules (run: cd runtime/js && npm ci)"
    return None


@pytest.fixture(scope="module")
def js_ready() -> None:
    missing = _missing_node_deps()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; CI needs the JS runtime's dependencies")
        pytest.skip(missing)
    subprocess.run(["npm", "run", "--silent", "build"], cwd=JS, check=True, timeout=300)


@pytest.mark.slow
def test_js_runtime_matches_python(js_ready, tiny_fp32_bundle: Path, realtext_int4_bundle: Path,
                                   tiny_fp32_kv16_bundle: Path) -> None:
    import vectors

    out = JS / "out" / "vectors"
    shutil.rmtree(out, ignore_errors=True)
    vectors.write_vectors(out, tiny_fp32_bundle, realtext_int4_bundle, tiny_fp32_kv16_bundle)
    env = {**os.environ, "SMOLEDGE_JS_VECTORS": str(out)}
    result = subprocess.run(["node", "--test", "--test-concurrency=1", "dist/test/"], cwd=JS, env=env,
                            capture_output=True, text=True, timeout=900)
    print(result.stdout[-20000:])
    print(result.stderr[-5000:], file=sys.stderr)
    assert result.returncode == 0, "the JS test suite failed (output above)"
    assert "\n# fail 0" in result.stdout, result.stdout[-2000:]
    if os.environ.get("CI") == "true":
        assert "\n# skipped 0" in result.stdout, "under CI every JS test must run"


def test_onnx_manifest_records_the_onnxruntime_floor(tiny_fp32_bundle: Path) -> None:
    """Export writes the opset, the contrib ops and the oldest onnxruntime that runs them (what a phone's
    onnxruntime must be at least); the JS suite loads the bundles with that oldest onnxruntime."""
    import json

    from smoledge.export.target_onnx import ORT_FOR_CONTRIB_OP, RUNTIME_FLOOR, _version

    runtime = json.loads((tiny_fp32_bundle / "manifest.json").read_text())["artifacts"]["onnx"]["runtime"]
    assert runtime["opset"] >= 17
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= set(runtime["contrib_ops"])  # rotary inside GQA
    assert _version(runtime["onnxruntime_min"]) >= _version(RUNTIME_FLOOR)
    assert all(_version(runtime["onnxruntime_min"]) >= _version(ORT_FOR_CONTRIB_OP[op]) for op in runtime["contrib_ops"])


def test_eight_bit_matmulnbits_raises_the_floor(tmp_path: Path) -> None:
    """onnxruntime < 1.22 refuses MatMulNBits with bits=8 (the default int4 recipe's lm_head / v_proj /
    down_proj): a graph holding one needs 1.22, a 4-bit one does not raise the floor."""
    import onnx
    from onnx import TensorProto, helper

    from smoledge.export.target_onnx import runtime_requirements

    def graph(bits: int) -> Path:
        node = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=32, N=8, bits=bits,
                                block_size=32)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
        path = tmp_path / f"m{bits}.onnx"
        onnx.save(model, str(path))
        return path

    eight = runtime_requirements([graph(8)], "1.32.0")
    assert eight["contrib_ops"] == ["MatMulNBits:8"] and eight["onnxruntime_min"] == "1.22"
    four = runtime_requirements([graph(4)], "1.32.0")
    assert four["contrib_ops"] == ["MatMulNBits"] and four["opset"] == 20


def test_js_schema_is_the_python_runtimes() -> None:
    """Both runtimes validate against one schema: the JS package ships a copy of runtime/manifest.schema.json."""
    assert (JS / "schema" / "manifest.schema.json").read_text() == (REPO / "runtime" / "manifest.schema.json").read_text(), \
        "copy runtime/manifest.schema.json to runtime/js/schema/ (the JS package ships it)"
