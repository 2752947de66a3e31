"""The Core ML target: three ``.mlpackage`` s for iOS 18 / macOS 15, compressed per recipe.

Per model: capture the wrapper (:mod:`smoledge.export.coreml_graphs`) -> ``ct.convert`` (ML program,
fp16 compute, iOS 18) -> name its weight constants after the HF parameters -> compress per recipe
(:mod:`smoledge.quantize.coreml_quant`) -> save into the bundle under ``coreml/``.

* ``vision_encoder.mlpackage``: one full tile -> image features (fixed shapes).
* ``embed_tokens.mlpackage``: token ids -> embeddings.  The embedding is its own model, as in the ONNX
  bundle, because image features are spliced into the embeddings before the decoder runs.
* ``decoder.mlpackage``: stateful; the KV cache is Core ML state (``key_cache`` / ``value_cache``,
  fp16), query and total lengths flexible (``RangeDim`` 1..capacity), so one model does prefill and
  decode.

An ``.mlpackage`` is a folder; the bundle manifest lists (and ``bundle verify`` checks) every file in it.
Nothing here needs Core ML itself: conversion and compression run on Linux; predictions need Apple's
runtime (see ``docs/coreml.md``).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from smoledge.errors import ConfigError
from smoledge.export.bundle_writer import BundleStaging
from smoledge.quantize.coreml_quant import METHODS
from smoledge.quantize.recipe import Recipe
from smoledge.runtime.manifest import AttentionMask, CoreMLArtifact, Graph, Tensor

FORMAT = "coreml"
MODELS = ("vision_encoder", "embed_tokens", "decoder")
DEPLOYMENT_TARGET = {"iOS": "18.0", "macOS": "15.0"}


@dataclass(frozen=True)
class CoreMLTargetOptions:
    context: int | None = 2048  # KV-state capacity in tokens; None = the model's whole context window
    compression: str = "linear"  # "linear": per-block int4/int8; "palettize": k-means lookup tables


def default_options() -> CoreMLTargetOptions:
    return CoreMLTargetOptions()


def capacity_for(model, options: CoreMLTargetOptions) -> int:
    window = int(model.config.text_config.max_position_embeddings)
    capacity = window if options.context is None else int(options.context)
    if not 2 <= capacity <= window:
        raise ConfigError(f"Core ML context {capacity} must be between 2 and the model's context window ({window})",
                          hint="pass a smaller context, or None for the whole window")
    return capacity


def export(model, staging: BundleStaging, recipe: Recipe, options: CoreMLTargetOptions,
           progress=None) -> CoreMLArtifact:
    import coremltools as ct

    from smoledge.export.coreml_convert import CONVERTERS
    from smoledge.export.coreml_graphs import KEY_CACHE, MASK_VALUE, VALUE_CACHE

    if options.compression not in METHODS:
        raise ConfigError(f"unknown Core ML compression {options.compression!r}; use one of {', '.join(METHODS)}")
    staging.clear_format(FORMAT)
    capacity = capacity_for(model, options)
    models, spec_version = {}, None
    for name in MODELS:
        if progress:
            progress.set_postfix_str(f"coreml: {name}")
        converted = CONVERTERS[name](model, capacity)
        models[name], spec_version = _finish_model(name, converted, model, staging, recipe, options)
        del converted
        gc.collect()
        if progress:
            progress.update(1)
    return CoreMLArtifact(
        format=FORMAT, graphs=models, context_capacity=capacity, recipe=recipe.to_dict(),
        weight_bytes=sum(m.bytes for m in models.values()),
        attention_mask=AttentionMask("additive", (1, 1, "query", "total"), 0.0, float(MASK_VALUE)),
        cache={"kind": "state", "states": [KEY_CACHE, VALUE_CACHE],
               "layout": ["layers", "kv_heads", "capacity", "head_dim"],
               "written": "positions [total - query, total) on every call"},
        full_tiles_only=True, deployment_target=DEPLOYMENT_TARGET, specification_version=spec_version,
        compute_precision="float16", compression=options.compression,
        runtime={"coremltools_min": "8.0", "exported_with_coremltools": ct.__version__,
                 "requires": "macOS 15+ / iOS 18+ (Core ML model state)"})


def _finish_model(name: str, converted, model, staging: BundleStaging, recipe: Recipe,
                  options: CoreMLTargetOptions) -> tuple[Graph, int]:
    from smoledge.export.coreml_convert import weight_names
    from smoledge.quantize.coreml_quant import compress, weight_report

    names = weight_names(converted.mlmodel._mil_program, converted.module, model)
    compressed = compress(converted.mlmodel, recipe, names, options.compression)
    report = weight_report(compressed._mil_program, names, recipe, options.compression)
    package = staging.path(f"{FORMAT}/{name}.mlpackage")
    compressed.save(str(package))
    files = sorted(p for p in package.rglob("*") if p.is_file())
    io = converted.io()
    section = Graph(
        file=package.relative_to(staging.staging).as_posix(), method=None,
        files=tuple(f.relative_to(staging.staging).as_posix() for f in files),
        inputs=_tensors(io["inputs"]), outputs=_tensors(io["outputs"]), states=_tensors(io["states"]),
        dims={dim: tuple(bounds) for dim, bounds in io["dims"].items()}, precision=_precision(report.schemes),
        bytes=sum(f.stat().st_size for f in files), quantization=report.to_dict())
    return section, compressed.get_spec().specificationVersion


def _tensors(specs: dict) -> dict[str, Tensor]:
    return {name: Tensor(tuple(spec["shape"]), spec["dtype"]) for name, spec in specs.items()}


def _precision(schemes: dict[str, int]) -> str:
    used = sorted(label for label, count in schemes.items() if count and label != "float16")
    return "+".join(used + (["fp16"] if schemes.get("float16") else [])) or "fp16"
