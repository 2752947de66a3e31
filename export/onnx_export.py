"""The three SmolVLM graphs in ONNX: the vision encoder and embedding traced with transformers' own exporter,
the decoder built for ONNX Runtime (:mod:`smoledge.export.onnx_decoder`).

``transformers.exporters.OnnxExporter`` does the work (torch.export + its patch registry + onnxscript
optimisation + optional ONNX Runtime fusions); this module only supplies the export-friendly modules
from :mod:`smoledge.export.graphs`, sample inputs with the dynamic axes, and the canonical I/O names.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.export import Dim

from smoledge.export.graphs import EmbedTokensGraph, VisionEncoderGraph

log = logging.getLogger(__name__)

# Sample sizes must not be 0 or 1 on a dynamic axis (torch.export specialises those).
_BATCH, _SEQ, _TILES = 2, 5, 2


@dataclass(frozen=True)
class OnnxExportConfig:
    ort_fusions: str | None = "cpu"  # fuse into ONNX Runtime ops (RotaryEmbedding, norms) for the CPU EP
    opset: int | None = None
    kv_cache: str = "float32"  # the decoder's KV cache dtype (the recipe's kv_cache)


@dataclass(frozen=True)
class GraphSpec:
    """What the manifest records of one graph: its I/O names, symbolic shapes and (where known) dtypes."""

    name: str
    inputs: dict[str, list]
    outputs: dict[str, list]
    fused: bool = False  # built with ONNX Runtime's fused ops already (no fusion pass after quantization)
    dtypes: dict[str, str] = field(default_factory=dict)  # I/O name -> numpy dtype name; absent = unrecorded


def _export(module, sample: dict, dynamic_shapes: dict, config: OnnxExportConfig):
    from transformers.exporters import OnnxConfig, OnnxExporter

    # Fusions run later (fuse_for_onnxruntime), once quantization has matched weights by module name.
    onnx_config = OnnxConfig(dynamic_shapes=dynamic_shapes, opset_version=config.opset)
    # torch.onnx.export prints its progress to stdout and OnnxExporter offers no switch for it: keep it
    # for --debug logging instead of the user's terminal.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        program, _metadata = OnnxExporter().export_program(module, sample, onnx_config)
    log.debug("torch.onnx.export output:\n%s", captured.getvalue())
    return program


def _name_io(program, spec: GraphSpec) -> None:
    """Give the graph's inputs and outputs their canonical names and symbolic dims."""
    import onnx_ir as ir

    graph = program.graph
    if len(graph.inputs) != len(spec.inputs) or len(graph.outputs) != len(spec.outputs):
        raise RuntimeError(f"{spec.name}: traced {len(graph.inputs)} inputs / {len(graph.outputs)} outputs, "
                           f"expected {len(spec.inputs)} / {len(spec.outputs)}")
    for value, (name, dims) in zip(list(graph.inputs) + list(graph.outputs),
                                   list(spec.inputs.items()) + list(spec.outputs.items())):
        value.name = name
        value.shape = ir.Shape(dims)


def vision_spec(model) -> GraphSpec:
    vc = model.config.vision_config
    size = vc.image_size
    seq = (size // vc.patch_size // model.config.scale_factor) ** 2
    return GraphSpec(
        "vision_encoder",
        {"pixel_values": ["num_images", 3, size, size], "pixel_attention_mask": ["num_images", size, size]},
        {"image_features": ["num_images", seq, model.config.text_config.hidden_size]},
    )


def embed_spec(model) -> GraphSpec:
    hidden = model.config.text_config.hidden_size
    return GraphSpec("embed_tokens", {"input_ids": ["batch_size", "sequence_length"]},
                     {"inputs_embeds": ["batch_size", "sequence_length", hidden]})


def decoder_spec(model, kv_cache: str = "float32") -> GraphSpec:
    from smoledge.export.onnx_decoder import decoder_dtypes, decoder_io

    return GraphSpec("decoder_model_merged", *decoder_io(model), fused=True, dtypes=decoder_dtypes(model, kv_cache))


def export_vision(model, config: OnnxExportConfig):
    size = model.config.vision_config.image_size
    sample = {
        "pixel_values": torch.randn(_TILES, 3, size, size),
        "pixel_attention_mask": torch.ones(_TILES, size, size, dtype=torch.bool),
    }
    tiles = Dim("num_images")
    program = _export(VisionEncoderGraph(model), sample,
                      {"pixel_values": {0: tiles}, "pixel_attention_mask": {0: tiles}}, config)
    spec = vision_spec(model)
    _name_io(program, spec)
    return program, spec


def export_embed(model, config: OnnxExportConfig):
    sample = {"input_ids": torch.randint(0, model.config.text_config.vocab_size, (_BATCH, _SEQ))}
    program = _export(EmbedTokensGraph(model), sample, {"input_ids": {0: Dim("batch"), 1: Dim("seq")}}, config)
    spec = embed_spec(model)
    _name_io(program, spec)
    return program, spec


def export_decoder(model, config: OnnxExportConfig):
    """Built op by op for ONNX Runtime (GroupQueryAttention, a shared KV buffer), not traced: onnx_decoder."""
    from smoledge.export.onnx_decoder import build

    return build(model, kv_cache=config.kv_cache), decoder_spec(model, config.kv_cache)


EXPORTERS = {"vision_encoder": export_vision, "embed_tokens": export_embed, "decoder_model_merged": export_decoder}


def save(program, path: Path) -> list[Path]:
    """Write a graph with its weights in a ``.data`` sidecar; returns the files written."""
    from transformers.exporters import OnnxExporter

    OnnxExporter.save_program(program, path)
    return [path.parent / f for f in OnnxExporter.program_files(path.name) if (path.parent / f).exists()]


# Wrapper attribute paths -> the HF parameter names recipes are written against.
_SCOPE_PREFIXES = {
    "vision_encoder": (("vision.", "model.vision_model."), ("connector.", "model.connector.")),
    "embed_tokens": (("embed", "model.text_model.embed_tokens"),),
    "decoder_model_merged": (("decoder.text.", "model.text_model."), ("decoder.lm_head", "lm_head")),
}


def _module_scope(node) -> str | None:
    import ast

    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    path = ast.literal_eval(scopes)
    return path[-2] if len(path) >= 2 else None


def name_weight_nodes(program, graph_name: str) -> dict[str, str]:
    """Name each MatMul/Gather that reads a weight after the HF module it came from.

    The recipe's rules match these names.  Returns {node name: weight initializer name}.
    """
    initializers = program.graph.initializers
    named: dict[str, str] = {}
    for node in program.graph:
        if node.op_type not in ("MatMul", "Gather") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1] if node.op_type == "MatMul" else node.inputs[0]
        scope = _module_scope(node)
        if weight is None or weight.name not in initializers or scope is None:
            continue
        for old, new in _SCOPE_PREFIXES[graph_name]:
            if scope.startswith(old):
                scope = new + scope[len(old):]
                break
        if scope in named:  # keep names unique: a module used twice gets a suffix
            scope = f"{scope}#{sum(k.startswith(scope) for k in named)}"
        node.name = scope
        named[scope] = weight.name
    return named


def fuse_for_onnxruntime(program, ort_fusions: str | None) -> None:
    """Fuse into ONNX Runtime's own ops (rotary, skip/RMS norms) after quantization kept the names."""
    if ort_fusions:
        from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime as fuse

        fuse(program, ort_fusions)
