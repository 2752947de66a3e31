"""The ONNX target: three graphs, quantized per recipe, fused for ONNX Runtime.

Per graph: trace (transformers' OnnxExporter) -> name weight nodes after their HF modules -> quantize
(onnxruntime's MatMulNBitsQuantizer, per recipe) -> fuse for ONNX Runtime -> write with a ``.data``
sidecar.  Intermediate files go through disk so the fp32 graph and its quantized copy are never both
in memory as Python objects.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path

from smoledge.export.bundle_writer import BundleStaging, scratch_prefix
from smoledge.quantize.recipe import Recipe
from smoledge.runtime.manifest import Graph, OnnxArtifact, Tensor

FORMAT = "onnx"
# logical graph name -> its file's name (the onnx-community SmolVLM names)
GRAPHS = {"vision_encoder": "vision_encoder", "embed_tokens": "embed_tokens", "decoder": "decoder_model_merged"}

# The first onnxruntime release that runs each default-domain opset and each contrib op the graphs may hold.
# Checked where it matters: 8-bit MatMulNBits fails to load on onnxruntime 1.20.1 / 1.21.x ("Only 4b
# quantization is supported") and loads on 1.22.0; the JS runtime's test loads the bundles with its oldest
# supported onnxruntime-node (1.22.0). An opset or op not listed makes the floor the exporting onnxruntime.
ORT_FOR_OPSET = {17: "1.13", 18: "1.14", 19: "1.16", 20: "1.17", 21: "1.20"}
ORT_FOR_CONTRIB_OP = {
    "MatMulNBits": "1.17", "MatMulNBits:8": "1.22", "GatherBlockQuantized": "1.20", "RotaryEmbedding": "1.17",
    "GroupQueryAttention": "1.17",
    "SkipSimplifiedLayerNormalization": "1.16", "SimplifiedLayerNormalization": "1.16", "SkipLayerNormalization": "1.9",
    "FusedMatMul": "1.9", "BiasGelu": "1.9", "FastGelu": "1.9", "Gelu": "1.9", "QuickGelu": "1.16",
    "MultiHeadAttention": "1.16", "Attention": "1.9", "BiasAdd": "1.14", "BiasSplitGelu": "1.14",
}
RUNTIME_FLOOR = "1.22"  # the oldest onnxruntime the runtimes are tested with (runtime/js: onnxruntime-node-oldest)



BUILT_GRAPHS = {"decoder_model_merged"}  # built op by op (export/onnx_decoder.py), not traced
BUILT_GRAPH_STEP = "building the GroupQueryAttention graph"


@dataclass(frozen=True)
class OnnxTargetOptions:
    ort_fusions: str | None = "cpu"
    opset: int | None = None


def export(model, staging: BundleStaging, recipe: Recipe, options: OnnxTargetOptions,
           progress=None) -> OnnxArtifact:
    import onnxruntime

    from smoledge.export.onnx_export import EXPORTERS, OnnxExportConfig
    from smoledge.quantize.calibration import collect_for

    # the tokenizer the pipeline wrote (staging.path() would unlink it: it is for writing)
    calibration = collect_for(model, recipe, staging.staging / "tokenizer.json")
    staging.clear_format(FORMAT)
    config = OnnxExportConfig(opset=options.opset, kv_cache=recipe.kv_cache)
    graphs = {}
    with tempfile.TemporaryDirectory(dir=staging.staging.parent, prefix=scratch_prefix("onnx")) as tmp:
        for name, file_name in GRAPHS.items():
            if progress:
                progress.set_postfix_str(f"onnx: {file_name}")
                # no callback inside either: the ticker shows the step's time
                progress.detail(BUILT_GRAPH_STEP if file_name in BUILT_GRAPHS else "tracing with torch.onnx")
            program, spec = EXPORTERS[file_name](model, config)
            graphs[name] = _finish_graph(program, spec, file_name, staging, recipe, options, Path(tmp), calibration,
                                         progress)
            del program
            gc.collect()
            if progress:
                progress.update(1)
    return OnnxArtifact(
        format=FORMAT, graphs=graphs, context_capacity=None, recipe=recipe.to_dict(),
        weight_bytes=sum(g.bytes for g in graphs.values()), ort_fusions=options.ort_fusions,
        runtime=runtime_requirements([staging.staging / g.file for g in graphs.values()], onnxruntime.__version__))


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


def _op_key(node) -> str:
    bits = next((a.i for a in node.attribute if a.name == "bits"), 4) if node.op_type == "MatMulNBits" else 4
    return node.op_type if bits == 4 else f"{node.op_type}:{bits}"


def runtime_requirements(files: list[Path], exported_with: str) -> dict:
    """What the graphs need from onnxruntime: the default-domain opset, the contrib (com.microsoft) ops (a
    MatMulNBits of other than 4 bits as ``MatMulNBits:8``), and the oldest onnxruntime that runs them all
    (``onnxruntime_min``)."""
    import onnx

    opset, contrib = 0, set()
    for path in files:
        proto = onnx.load(str(path), load_external_data=False)
        opset = max([opset] + [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")])
        contrib |= {_op_key(n) for n in proto.graph.node if n.domain == "com.microsoft"}
    floors = [RUNTIME_FLOOR, ORT_FOR_OPSET.get(opset, exported_with)]
    floors += [ORT_FOR_CONTRIB_OP.get(op, exported_with) for op in contrib]
    return {"onnxruntime_min": max(floors, key=_version), "opset": opset, "contrib_ops": sorted(contrib),
            "exported_with_onnxruntime": exported_with}


def _finish_graph(program, spec, name: str, staging: BundleStaging, recipe: Recipe,
                  options: OnnxTargetOptions, tmp: Path, calibration=None, progress=None) -> Graph:
    import onnx
    import onnx_ir as ir

    from smoledge.export.onnx_export import fuse_for_onnxruntime, name_weight_nodes, save
    from smoledge.quantize.onnx_quant import quantize_model

    say = progress.detail if progress else lambda text: None
    name_weight_nodes(program, name)
    raw = tmp / f"{name}.onnx"
    say("saving the traced graph")
    save(program, raw)
    proto = onnx.load(str(raw))
    say("quantizing weights")
    with _counting_weights(progress, proto, recipe):
        proto, report = quantize_model(proto, recipe, calibration)
    quantized = tmp / f"{name}.q.onnx"
    say("saving the quantized graph")
    onnx.save(proto, str(quantized), save_as_external_data=True, location=f"{name}.q.onnx.data")
    del proto
    program = ir.load(str(quantized))
    say("fusing for onnxruntime")
    fuse_for_onnxruntime(program, None if spec.fused else options.ort_fusions)
    say("writing into the bundle")
    files = save(program, staging.path(f"{FORMAT}/{name}.onnx"))
    rel = [f.relative_to(staging.staging).as_posix() for f in files]
    return Graph(file=rel[0], method=None, files=tuple(rel), inputs=_tensors(spec.inputs, spec.dtypes),
                 outputs=_tensors(spec.outputs, spec.dtypes), states={}, dims={}, precision=_precision(report.schemes),
                 bytes=sum(f.stat().st_size for f in files), quantization=report.to_dict())


def _counting_weights(progress, proto, recipe: Recipe):
    """Per-weight progress from onnxruntime's quantizer, whose only signal is a log record per weight; the
    calibrated schemes run before it, in our own code."""
    if progress is None:
        return contextlib.nullcontext()
    from smoledge.quantize.onnx_quant import planned_schemes

    names = {n for n, s in planned_schemes(proto, recipe).items() if s is not None and not s.calibrated}
    return progress.counting_logs("onnxruntime.quantization.matmul_nbits_quantizer", "complete quantization of",
                                  "quantizing weights", names)


def _tensors(shapes: dict[str, list], dtypes: dict[str, str]) -> dict[str, Tensor]:
    return {name: Tensor(tuple(dims), dtypes.get(name)) for name, dims in shapes.items()}


def _precision(schemes: dict[str, int]) -> str:
    used = [label for label, count in schemes.items() if count and label != "float"]
    if not used:
        return "fp32"
    return "+".join(sorted(used)) + ("+fp32" if schemes.get("float") else "")


def default_options() -> OnnxTargetOptions:
    return OnnxTargetOptions()
