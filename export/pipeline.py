"""One export: checkpoint -> graphs -> quantize -> bundle.

Targets are named by the format registry (:mod:`smoledge.runtime.formats`); each module exposes
``FORMAT``, an options dataclass and ``export(model, staging, recipe, options, progress) -> Artifact``
returning its typed manifest section.  ``progress`` is a :class:`smoledge.progress.Progress`: a target
calls ``set_postfix_str(step)`` and ``update()`` for each of its three steps, and ``detail(text)`` for what
a step is doing now (see ``docs/progress.md``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from smoledge.errors import ExportError, SmolEdgeError
from smoledge.progress import Progress
from smoledge.quantize.recipe import Recipe
from smoledge.runtime.formats import format_spec
from smoledge.runtime.manifest import Artifact, Cloud

log = logging.getLogger(__name__)


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
    cloud_models: tuple[str, ...] = ()  # the cloud substitute, then alternatives (empty: the package defaults)
    measure_memory: bool = True  # probe peak memory in child processes (export/memory_measure.py)


def target_module(fmt: str):
    return format_spec(fmt).export_target()


def export_bundle(job: ExportJob, *, show_progress: bool = True, progress: Progress | None = None) -> Path:
    """Export ``job``; progress goes to ``progress`` (a new one on stderr when None, silent without
    ``show_progress``).  The libraries' own tqdm bars (coremltools, transformers) feed its detail line,
    or are dropped when it is silent."""
    if progress is None:
        with Progress("export", enabled=show_progress) as progress:
            return export_bundle(job, progress=progress)
    with progress.library_bars():
        return _export(job, progress)


def _export(job: ExportJob, bar: Progress) -> Path:
    bar.step("loading torch and transformers")
    from smoledge.export.bundle_writer import BundleStaging
    from smoledge.export.describe import describe_model
    from smoledge.export.loader import load_model, load_processor, resolve

    modules = {fmt: target_module(fmt) for fmt in job.formats}
    checkpoint = resolve(job.model, job.revision)
    adapter = None
    if job.adapter:
        from smoledge.export.adapter import merge_adapter, resolve_adapter, with_adapter

        adapter = resolve_adapter(job.adapter, job.adapter_revision)
    bar.total = 2 + 3 * len(modules)
    bar.step("loading model")
    model, processor = load_model(checkpoint), load_processor(checkpoint)
    if adapter is not None:
        model, checkpoint = merge_adapter(model, adapter), with_adapter(checkpoint, adapter)
    bar.advance()
    cloud = Cloud(job.cloud_models[0], tuple(job.cloud_models[1:])) if job.cloud_models else Cloud(None, ())
    base = describe_model(checkpoint, model, processor, adapter.manifest_entry() if adapter else None, cloud)
    with BundleStaging(job.out, checkpoint.file_hashes) as staging:
        artifacts = dict(staging.previous.artifacts) if staging.previous else {}
        processor.tokenizer.backend_tokenizer.save(str(staging.path(base.tokenizer.file)))
        for fmt, module in modules.items():
            options = job.target_options.get(fmt) or module.default_options()
            recipe = target_recipe(job.recipe, fmt, model.config.text_config.num_hidden_layers, bar)
            artifacts[fmt] = _run_target(module, model, staging, recipe, options, bar)
        memory = dataclasses.replace(base.memory, weight_bytes=max(a.weight_bytes for a in artifacts.values()))
        manifest = dataclasses.replace(base, memory=memory, artifacts=artifacts)
        if job.measure_memory:
            from smoledge.export.memory_measure import with_measured_memory

            bar.step("measuring memory")
            manifest = with_measured_memory(staging, manifest)
        bar.step("writing bundle")
        path = staging.commit(manifest)
        bar.advance()
    return path


def target_recipe(recipe: Recipe, fmt: str, n_layers: int, bar: Progress) -> Recipe:
    """The recipe the ``fmt`` target applies: the job's, or the fallback its ``formats`` names for ``fmt``
    (said on the progress stream), with layer selectors (llama.cpp's use_more_bits) resolved against the
    model, so the manifest says which layers."""
    chosen = recipe.for_format(fmt)
    if chosen is not recipe:
        line = f"{fmt}: recipe {chosen.name} (the {fmt} fallback of {recipe.name})"
        log.info(line)
        bar.write(line)
    return chosen.for_layers(n_layers)


def _run_target(module, model, staging, recipe, options, bar) -> Artifact:
    try:
        return module.export(model, staging, recipe, options, progress=bar)
    except SmolEdgeError:
        raise
    except Exception as err:  # a tracer or quantizer failure deep in a library
        log.debug("export failed", exc_info=True)
        raise ExportError(f"{module.FORMAT} export failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}",
                          hint="rerun with --debug for the full traceback") from err
