"""The tiny ExecuTorch test bundles, exported once and kept in the smoledge cache dir, keyed by what they are
built from (model folder, recipe, formats, the export/quantize sources, torch / executorch / torchao /
onnxruntime versions).  An ExecuTorch export takes tens of seconds even for the tiny model on a shared
2-core machine; a cached bundle is reused by every test module and every later session until an input
changes.  Written to a staging folder and renamed, so a half-written bundle is never picked up."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("export", "quantize")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("torch", "executorch", "torchao", "onnxruntime", "onnx", "transformers"):
        try:
            found.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            found.append(f"{package}=-")
    return ",".join(found)


def bundle_key(model_dir: Path, recipe: str, formats: tuple[str, ...]) -> str:
    digest = hashlib.sha256(f"{recipe}:{','.join(formats)}:{_versions()}".encode())
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
            if path.suffix in (".json", ".jinja", ".txt"):
                digest.update(path.read_bytes())
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".json"):
                digest.update(str(path.relative_to(REPO)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def cached_bundle(model_dir: Path, name: str, recipe: str, formats: tuple[str, ...]) -> Path:
    """``name`` exported from ``model_dir`` with ``recipe`` and ``formats`` (in that order, each added to
    the bundle the previous ones made), from the cache when its inputs have not changed."""
    from smoledge.export.pipeline import ExportJob, export_bundle
    from smoledge.quantize.recipe import load_recipe
    from smoledge.runtime.cache import cache_path

    out = cache_path("test-bundles") / f"{name}-{bundle_key(model_dir, recipe, formats)}"
    if (out / "manifest.json").is_file():
        return out
    staging = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for fmt in formats:
        export_bundle(ExportJob(model=str(model_dir), out=staging, recipe=load_recipe(recipe), formats=(fmt,)),
                      show_progress=False)
    try:
        staging.rename(out)
    except OSError:  # another session finished the same bundle first
        shutil.rmtree(staging, ignore_errors=True)
    return out
