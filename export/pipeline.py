"""One export: checkpoint -> graphs -> quantize -> bundle.

Targets are registered in ``TARGETS`` (format -> module); each module exposes ``FORMAT``, an options
dataclass and ``export(model, staging, recipe, options, progress) -> dict`` returning its manifest
section.  Adding a format is one new module and one line here.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from smoledge.errors import ConfigError, ExportError, SmolEdgeError
from smoledge.quantize.recipe import Recipe

log = logging.getLogger(__name__)

TARGETS = {
    "onnx": "smoledge.export.target_onnx",
    "executorch": "smoledge.export.target_executorch",
    "coreml": "smoledge.export.target_coreml",
}


@dataclass(frozen=True)
class ExportJob:
    model: str
    out: Path
    recipe: Recipe
    formats: tuple[str, ...] = ("onnx",)
    revision: str | None = None
    target_options: dict = field(default_factory=dict)  # format -> that target's options object
    adapter: str | None = None  # PEFT LoRA adapter (folder or hub id) merged into the weights first
    adapter_revision: str | None = None


def target_module(fmt: str):
    if fmt not in TARGETS:
        raise ConfigError(f"unknown export format {fmt!r}; available: {', '.join(TARGETS)}")
    try:
        return importlib.import_module(TARGETS[fmt])
    except ImportError as err:
        raise ConfigError(f"the {fmt} exporter needs a package that is not installed ({err.name})",
                          hint="pip install 'smoledge[export]'") from None


def export_bundle(job: ExportJob, *, show_progress: bool = True) -> Path:
    from tqdm import tqdm

    from smoledge.export.bundle_writer import BundleStaging
    from smoledge.export.describe import describe_model
    from smoledge.export.loader import load_model, load_processor, resolve

    modules = {fmt: target_module(fmt) for fmt in job.formats}
    checkpoint = resolve(job.model, job.revision)
    adapter = None
    if job.adapter:
        from smoledge.export.adapter import merge_adapter, resolve_adapter, with_adapter

        adapter = resolve_adapter(job.adapter, job.adapter_revision)
    steps = 2 + 3 * len(modules)
    with tqdm(total=steps, desc="export", disable=not show_progress, unit="step") as bar:
        bar.set_postfix_str("loading model")
        model, processor = load_model(checkpoint), load_processor(checkpoint)
        if adapter is not None:
            model, checkpoint = merge_adapter(model, adapter), with_adapter(checkpoint, adapter)
        bar.update(1)
        base = describe_model(checkpoint, model, processor, adapter.manifest_entry() if adapter else None)
        with BundleStaging(job.out, checkpoint.file_hashes) as staging:
            artifacts = dict((staging.previous or {}).get("artifacts", {}))
            processor.tokenizer.backend_tokenizer.save(str(staging.path(base["tokenizer"]["file"])))
            for fmt, module in modules.items():
                options = job.target_options.get(fmt) or module.default_options()
                artifacts[fmt] = _run_target(module, model, staging, job.recipe, options, bar)
            manifest = {**base, "artifacts": artifacts}
            manifest["memory"]["weight_bytes"] = max(a["weight_bytes"] for a in artifacts.values())
            bar.set_postfix_str("writing bundle")
            path = staging.commit(manifest)
            bar.update(1)
    return path


def _run_target(module, model, staging, recipe, options, bar) -> dict:
    try:
        return module.export(model, staging, recipe, options, progress=bar)
    except SmolEdgeError:
        raise
    except Exception as err:  # a tracer or quantizer failure deep in a library
        log.debug("export failed", exc_info=True)
        raise ExportError(f"{module.FORMAT} export failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}",
                          hint="rerun with --debug for the full traceback") from err
