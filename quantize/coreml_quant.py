"""Apply a :class:`~smoledge.quantize.recipe.Recipe` to a converted Core ML program with
``coremltools.optimize.coreml``.

A scheme becomes one op config, set per weight constant (``OptimizationConfig.op_name_configs``), never
globally: a global config would also compress the RoPE tables and the vision position embeddings.

==============================  ========================================================================
recipe scheme                   coremltools config
==============================  ========================================================================
``bits: null``                  none: the weight stays fp16
``bits: 4|8``, asymmetric       ``OpLinearQuantizerConfig(mode="linear", dtype="int4"|"int8",
                                granularity="per_block", block_size=(1, block_size))`` ->
                                ``constexpr_blockwise_shift_scale`` with an offset
``bits: 4|8``, ``symmetric``    the same with ``mode="linear_symmetric"`` (no offset)
method ``palettize``            ``OpPalettizerConfig(mode="kmeans", nbits=bits, granularity=
                                "per_grouped_channel", group_size=block_size, channel_axis=0)`` ->
                                ``constexpr_lut_to_dense``: one 2**bits-entry table per block_size rows
``algorithm: hqq``              refused: coremltools has round-to-nearest and k-means only
==============================  ========================================================================

Blocks run along the input axis of a linear weight ``[out, in]`` and along the hidden axis of the
embedding table ``[vocab, hidden]``, as in the ONNX target.  ``accuracy_level`` (an onnxruntime setting)
does not apply.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from smoledge.errors import ConfigError
from smoledge.quantize.recipe import QuantReport, Recipe, Scheme

log = logging.getLogger(__name__)

METHODS = ("linear", "palettize")
WEIGHT_OPS = {"linear": "weight", "gather": "x"}  # MIL op type -> the input that holds an HF weight
COMPRESSED_OPS = ("constexpr_blockwise_shift_scale", "constexpr_lut_to_dense")


def scheme_label(scheme: Scheme | None, method: str) -> str:
    if scheme is None:
        return "float16"
    scheme = scheme.rtn_layout()  # calibrated grids are ONNX-only: Core ML rounds to nearest
    return f"palettized{scheme.bits}-g{scheme.block_size}-kmeans" if method == "palettize" else scheme.label()


def op_config(scheme: Scheme, method: str):
    import coremltools.optimize.coreml as cto

    scheme = scheme.rtn_layout()
    if scheme.algorithm != "rtn":
        raise ConfigError(f"the coreml target cannot use the {scheme.algorithm!r} quantization algorithm",
                          hint="use a recipe with algorithm rtn (the default) for --format coreml")
    if method == "palettize":
        return cto.OpPalettizerConfig(mode="kmeans", nbits=scheme.bits, granularity="per_grouped_channel",
                                      group_size=scheme.block_size, channel_axis=0, weight_threshold=0)
    return cto.OpLinearQuantizerConfig(mode="linear_symmetric" if scheme.symmetric else "linear",
                                       dtype=f"int{scheme.bits}", granularity="per_block",
                                       block_size=(1, scheme.block_size), weight_threshold=0)


def optimization_config(recipe: Recipe, names: dict[str, str], method: str):
    """One op config per weight constant the recipe quantizes; ``names`` maps const name -> HF name."""
    import coremltools.optimize.coreml as cto

    if method not in METHODS:
        raise ConfigError(f"unknown Core ML compression {method!r}; use one of {', '.join(METHODS)}")
    configs = {}
    recipe = recipe.for_weights(names.values())
    for const, hf_name in names.items():
        scheme = recipe.scheme_for(hf_name)
        if scheme is not None:
            configs[const] = op_config(scheme, method)
    return cto.OptimizationConfig(op_name_configs=configs) if configs else None


def compress(mlmodel, recipe: Recipe, names: dict[str, str], method: str = "linear"):
    """The compressed model (or the same one when the recipe keeps every weight in float)."""
    import coremltools.optimize.coreml as cto

    config = optimization_config(recipe, names, method)
    if config is None:
        return mlmodel
    apply = cto.palettize_weights if method == "palettize" else cto.linear_quantize_weights
    return apply(mlmodel, config)


def weight_report(program, expected: dict[str, str], recipe: Recipe, method: str) -> QuantReport:
    """Count what the program really stores for each named weight (coremltools skips a weight whose
    axes its block does not divide; that weight is reported as float16, with a warning)."""
    counts: dict[str, int] = defaultdict(int)
    weights = stored = 0
    recipe = recipe.for_weights(expected.values())
    for op in program.functions["main"].operations:
        slot = WEIGHT_OPS.get(op.op_type)
        var = getattr(op, slot, None) if slot else None
        source = var.op if var is not None else None
        if source is None or source.name not in expected and _root_name(source) not in expected:
            continue
        hf_name = expected.get(source.name) or expected[_root_name(source)]
        asked = recipe.scheme_for(hf_name)
        compressed = source.op_type in COMPRESSED_OPS
        if asked is not None and not compressed:
            log.warning("coremltools left %s in float16 (%s asked)", hf_name, scheme_label(asked, method))
        counts[scheme_label(asked if compressed else None, method)] += 1
        weights += int(np.prod(var.shape))
        stored += _stored_bytes(source)
    return QuantReport(dict(counts), weights, stored)


def _root_name(op) -> str:
    """coremltools names a compressed weight's op after the const it replaced, plus a suffix."""
    for suffix in ("_quantized", "_palettized"):
        if op.name.endswith(suffix):
            return op.name.removesuffix(suffix)
    return op.name


def _stored_bytes(op) -> int:
    if op.op_type == "const":
        return op.outputs[0].val.nbytes
    total = 0
    for var in op._input_vars.values():
        if var is None or var.op is None:
            continue
        val = var.op.outputs[0].val
        if isinstance(val, np.ndarray):
            from coremltools.converters.mil.mil import types

            bits = types.builtin_to_string(var.dtype)
            width = int("".join(c for c in bits if c.isdigit()) or 8)
            total += (val.size * width + 7) // 8
    return total
