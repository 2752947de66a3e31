"""Shared fixtures: offline models and bundles, built once per session (and cached across sessions in
the smoledge cache dir, keyed by their build recipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the internet: no Hub, and no cloud unless a test points the client at its own
# router on 127.0.0.1 (tests/test_cloud_fakes.py).  Subprocesses inherit both.  HF_HUB_OFFLINE also
# means never-cloud, so the fake router's fixtures clear it for the test that uses them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["SMOLEDGE_NO_CLOUD"] = "1"
os.environ.pop("HF_TOKEN", None)


# For the real-text model.  The bare "What is the capital of France?" is a coin toss for this 135M
# model: in fp32 its first answer token "The" leads "L'" by 0.08 logits, so any quantization (int8 too)
# may tip it into French.  Asking for one sentence gives a 1.5-logit lead in fp32 and a stable answer.
PARIS_QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="session", autouse=True)
def _every_manifest_matches_the_json_schema(tmp_path_factory):
    """At the end of the session: runtime/manifest.schema.json validates every bundle the suite built and
    rejects exactly the manifests the runtime's types reject (tests/schema_check.py)."""
    yield
    from schema_check import disagreements

    _, problems = disagreements(tmp_path_factory.getbasetemp())
    if problems:
        pytest.fail("\n".join(problems[:10]), pytrace=False)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from smoledge.export.demo_models import ensure_tiny_model

    return ensure_tiny_model()


def _export(model_dir: Path, out: Path, recipe: str, formats=("onnx",)) -> Path:
    from smoledge.export.pipeline import ExportJob, export_bundle
    from smoledge.quantize.recipe import load_recipe

    return export_bundle(ExportJob(model=str(model_dir), out=out, recipe=load_recipe(recipe), formats=formats),
                         show_progress=False)


@pytest.fixture(scope="session")
def export_bundle_to():
    return _export


@pytest.fixture(scope="session")
def tiny_fp32_bundle(tiny_model_dir, tmp_path_factory) -> Path:
    return _export(tiny_model_dir, tmp_path_factory.mktemp("bundles") / "tiny-fp32", "fp32")


@pytest.fixture(scope="session")
def tiny_int4_bundle(tiny_model_dir, tmp_path_factory) -> Path:
    return _export(tiny_model_dir, tmp_path_factory.mktemp("bundles") / "tiny-int4", "int4")


def _export_with_kv_cache(model_dir: Path, out: Path, recipe: str, kv_cache: str) -> Path:
    """A built-in recipe with its ``kv_cache`` replaced (the ONNX decoder's KV cache dtype)."""
    from dataclasses import replace

    from smoledge.export.pipeline import ExportJob, export_bundle
    from smoledge.quantize.recipe import load_recipe

    job = ExportJob(model=str(model_dir), out=out, recipe=replace(load_recipe(recipe), kv_cache=kv_cache),
                    formats=("onnx",))
    return export_bundle(job, show_progress=False)


@pytest.fixture(scope="session")
def export_with_kv_cache():
    return _export_with_kv_cache


@pytest.fixture(scope="session")
def tiny_fp32_kv16_bundle(tiny_model_dir, tmp_path_factory) -> Path:
    """fp32 weights with an fp16 KV cache: the cache's own effect, nothing else changed."""
    return _export_with_kv_cache(tiny_model_dir, tmp_path_factory.mktemp("bundles") / "tiny-fp32-kv16", "fp32",
                                 "float16")


@pytest.fixture(scope="session")
def fp32_bundle_with(tiny_model_dir, tiny_fp32_bundle, tmp_path_factory):
    """``fp32_bundle_with(fmt)``: the tiny fp32 ONNX bundle with format ``fmt`` added (built once per session)."""
    import shutil

    built = {"onnx": tiny_fp32_bundle}

    def build(fmt: str) -> Path:
        if fmt not in built:
            out = tmp_path_factory.mktemp(f"fp32-{fmt}") / "tiny-fp32"
            shutil.copytree(tiny_fp32_bundle, out)
            built[fmt] = _export(tiny_model_dir, out, "fp32", formats=(fmt,))
        return built[fmt]

    return build


@pytest.fixture(scope="session")
def realtext_model_dir() -> Path:
    from smoledge.export.realtext_model import ensure_realtext_model

    return ensure_realtext_model()


@pytest.fixture(scope="session")
def realtext_int4_bundle(realtext_model_dir, tmp_path_factory) -> Path:
    return _export(realtext_model_dir, tmp_path_factory.mktemp("bundles") / "realtext-int4", "int4")


@pytest.fixture(scope="session")
def realtext_default_bundle(realtext_model_dir, tmp_path_factory) -> Path:
    """The real-text model exported with the default recipe (``DEFAULT_RECIPE``, calibrated: GPTQ at
    export, cached per weight group under the smoledge cache's ``quant/``)."""
    from smoledge.quantize.recipe import DEFAULT_RECIPE

    return _export(realtext_model_dir, tmp_path_factory.mktemp("bundles") / "realtext-default", DEFAULT_RECIPE)


@pytest.fixture(scope="session")
def realtext_et_bundle(realtext_model_dir, realtext_default_bundle, tmp_path_factory) -> Path:
    """The real-text default bundle with the ExecuTorch .pte added beside its ONNX graphs (one bundle, two
    formats; the .pte takes the default recipe's ExecuTorch fallback, int4).  Slow: the real decoder's
    XNNPACK lowering takes several CPU minutes."""
    import shutil

    from smoledge.quantize.recipe import DEFAULT_RECIPE

    out = tmp_path_factory.mktemp("bundles") / "realtext-default-et"
    shutil.copytree(realtext_default_bundle, out)
    return _export(realtext_model_dir, out, DEFAULT_RECIPE, formats=("executorch",))


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_model_dir):
    from transformers import AutoProcessor, SmolVLMForConditionalGeneration

    model = SmolVLMForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(tiny_model_dir)


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``smoledge ARGS`` as a user would, in a fresh process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "smoledge.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def synthetic_image(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    # smooth gradients + noise: resizing and tiling give distinct, non-trivial tiles
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 / max(width, 1)), (y * 255 / max(height, 1)), ((x + y) * 127 / max(width + height, 1))], -1)
    img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype("uint8")
    return Image.fromarray(img).convert(mode)


# --- the test token never leaves the process (issue 17) ---------------------------------------------
# Every subprocess's output, every test's captured output and logs, every ledger file a test wrote and
# every body the fake router received is searched for the cloud tests' token; a hit fails the test (or
# the session, for what is only known at the end).
LEAK_TOKENS = ("hf_SECRETtesttoken0123456789",)  # test_cloud_fakes.TOKEN
_outputs: list[tuple[str, object]] = []
_basetemp: list[Path] = []


def find_leaks(sources) -> list[str]:
    """The names of the ``(name, text or bytes)`` sources that hold a test token."""
    hits = []
    for name, text in sources:
        data = text if isinstance(text, bytes) else str(text).encode("utf-8", "replace")
        if any(token.encode() in data for token in LEAK_TOKENS):
            hits.append(name)
    return hits


@pytest.fixture(scope="session", autouse=True)
def _record_subprocess_output(tmp_path_factory):
    _basetemp.append(tmp_path_factory.getbasetemp())
    original = subprocess.run

    def run(*args, **kwargs):
        result = original(*args, **kwargs)
        for stream in ("stdout", "stderr"):
            if getattr(result, stream, None):
                _outputs.append((f"{stream} of {str(result.args)[:120]}", getattr(result, stream)))
        return result

    patch = pytest.MonkeyPatch()
    patch.setattr(subprocess, "run", run)
    yield
    patch.undo()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    sources = [(f"{item.nodeid}: {title}", text) for title, text in report.sections]
    sources += _outputs
    _outputs.clear()
    leaks = find_leaks(sources)
    if leaks and report.outcome != "failed":
        report.outcome = "failed"
        report.longrepr = f"the test token leaked into: {', '.join(leaks)}"


def pytest_sessionfinish(session, exitstatus):
    sources = []
    fakes = sys.modules.get("test_cloud_fakes")
    for router in getattr(fakes, "ALL_ROUTERS", []):
        sources += [(f"fake router body {r.path}", json.dumps(r.body)) for r in list(router.requests) if r.body]
    for root in _basetemp:
        sources += [(str(p), p.read_bytes()) for p in root.rglob("*ledger*") if p.is_file()]
    leaks = find_leaks(sources)
    if leaks:
        print(f"\nthe test token leaked into: {', '.join(leaks[:20])}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
