"""The ONNX target: three graphs, quantized per recipe, fused for ONNX Runtime.

Per graph: trace (transformers' OnnxExporter) -> name weight nodes after their HF modules -> quantize
(onnxruntime's MatMulNBitsQuantizer, per recipe) -> fuse for ONNX Runtime -> write with a ``.data``
sidecar.  Intermediate files go through disk so the fp32 graph and its quantized copy are never both
in memory as Python objects.
"""

from __future__ import annotations

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
    config = OnnxExportConfig(opset=options.opset)
    graphs = {}
    with tempfile.TemporaryDirectory(dir=staging.staging.parent, prefix=scratch_prefix("onnx")) as tmp:
        for name, file_name in GRAPHS.items():
            if progress:
                progress.set_postfix_str(f"onnx: {file_name}")
            program, spec = EXPORTERS[file_name](model, config)
            graphs[name] = _finish_graph(program, spec, file_name, staging, recipe, options, Path(tmp), calibration)
            del program
            gc.collect()
            if progress:
                progress.update(1)
    return OnnxArtifact(
        format=FORMAT, graphs=graphs, context_capacity=None, recipe=recipe.to_dict(),
        weight_bytes=sum(g.bytes for g in graphs.values()), ort_fusions=options.ort_fusions,
        runtime={"onnxruntime_min": "1.20", "exported_with_onnxruntime": onnxruntime.__version__})


def _finish_graph(program, spec, name: str, staging: BundleStaging, recipe: Recipe,
                  options: OnnxTargetOptions, tmp: Path, calibration=None) -> Graph:
    import onnx
    import onnx_ir as ir

    from smoledge.export.onnx_export import fuse_for_onnxruntime, name_weight_nodes, save
    from smoledge.quantize.onnx_quant import quantize_model

    name_weight_nodes(program, name)
    raw = tmp / f"{name}.onnx"
    save(program, raw)
    proto = onnx.load(str(raw))
    proto, report = quantize_model(proto, recipe, calibration)
    quantized = tmp / f"{name}.q.onnx"
    onnx.save(proto, str(quantized), save_as_external_data=True, location=f"{name}.q.onnx.data")
    del proto
    program = ir.load(str(quantized))
    fuse_for_onnxruntime(program, options.ort_fusions)
    files = save(program, staging.path(f"{FORMAT}/{name}.onnx"))
    rel = [f.relative_to(staging.staging).as_posix() for f in files]
    return Graph(file=rel[0], method=None, files=tuple(rel), inputs=_tensors(spec.inputs),
                 outputs=_tensors(spec.outputs), states={}, dims={}, precision=_precision(report.schemes),
                 bytes=sum(f.stat().st_size for f in files), quantization=report.to_dict())


def _tensors(shapes: dict[str, list]) -> dict[str, Tensor]:
    return {name: Tensor(tuple(dims), None) for name, dims in shapes.items()}


def _precision(schemes: dict[str, int]) -> str:
    used = [label for label, count in schemes.items() if count and label != "float"]
    if not used:
        return "fp32"
    return "+".join(sorted(used)) + ("+fp32" if schemes.get("float") else "")


def default_options() -> OnnxTargetOptions:
    return OnnxTargetOptions()
