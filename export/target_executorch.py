"""The ExecuTorch target: one ``.pte`` with the methods ExecuTorch's LLM runners call.

HF model -> deep copy -> the recipe mapped onto torchao (:mod:`smoledge.quantize.torchao_quant`) ->
norms, GELU and ``rotate_half`` in forms XNNPACK runs (:mod:`smoledge.export.executorch_passes`) -> ``torch.export`` of
``vision_encoder`` / ``token_embedding`` / ``text_decoder`` (:mod:`smoledge.export.executorch_graphs`) ->
``to_edge_transform_and_lower`` with the XNNPACK partitioner and the runners' constant methods
(``get_max_seq_len``, ``get_eos_ids``, ...) -> ``to_executorch`` with quant fusion and constant
propagation (torchao's ``dequantize_affine`` + ``embedding`` -> ``quantized_decomposed::embedding_4bit``)
-> ``executorch/model.pte``.

The model the pipeline hands in is never modified: everything happens on a copy.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass

from smoledge.errors import ConfigError, install_hint
from smoledge.export.bundle_writer import BundleStaging
from smoledge.quantize.recipe import Recipe
from smoledge.runtime.manifest import ExecutorchArtifact, Graph, Tensor

log = logging.getLogger(__name__)

FORMAT = "executorch"
PTE_FILE = f"{FORMAT}/model.pte"
# logical graph name -> the program's method (the names ExecuTorch's LLM runners call)
METHOD_OF = {"vision_encoder": "vision_encoder", "embed_tokens": "token_embedding", "decoder": "text_decoder"}
METHODS = tuple(METHOD_OF.values())
DELEGATED = ("vision_encoder", "text_decoder")  # token_embedding is one (quantized) gather: portable kernel
SUPPORTED_TEXT_MODELS = ("llama",)
_SAMPLE_SEQ = 3  # a dynamic axis must not be traced at 0 or 1 (torch.export specialises those)
# Kernel libraries the program needs besides the portable ones, as Python modules that register them.
KERNEL_LIBRARIES = ("executorch.kernels.quantized", "executorch.extension.llm.custom_ops.custom_ops")


@dataclass(frozen=True)
class ExecutorchTargetOptions:
    max_context_len: int | None = 2048  # static KV cache positions; None = the model's context length


def default_options() -> ExecutorchTargetOptions:
    return ExecutorchTargetOptions()


def check_supported(model) -> None:
    """Raise a one-line :class:`ConfigError` for a model this target cannot export."""
    text = model.config.text_config
    if text.model_type not in SUPPORTED_TEXT_MODELS:
        raise ConfigError(f"the ExecuTorch target exports Llama text decoders (SmolVLM / SmolVLM2), not "
                          f"{text.model_type!r}", hint="export this model with --format onnx")
    layer_types = getattr(text, "layer_types", None) or ()
    if getattr(text, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        raise ConfigError("the ExecuTorch target has no sliding-window attention",
                          hint="export this model with --format onnx")


def context_len(model, options: ExecutorchTargetOptions) -> int:
    limit = int(model.config.text_config.max_position_embeddings)
    wanted = limit if options.max_context_len is None else options.max_context_len  # 0 is refused, not "full"
    if wanted < 16:
        raise ConfigError(f"max_context_len must be at least 16, got {wanted}",
                          hint="pass None (--max-context-len full) for the model's whole context window")
    return min(wanted, limit)


def export(model, staging: BundleStaging, recipe: Recipe, options: ExecutorchTargetOptions,
           progress=None) -> ExecutorchArtifact:
    _require_executorch()
    check_supported(model)
    max_len = context_len(model, options)
    staging.clear_format(FORMAT)
    clock = _Steps(progress)
    clock.start("executorch: quantize + trace")
    clock.detail("quantizing a copy with torchao")
    prepared, plan = prepare_model(model, recipe)
    clock.detail(f"torch.export of {', '.join(METHODS)}")
    programs = export_methods(prepared, max_len)
    del prepared
    clock.start("executorch: lower to XNNPACK")  # one library call for all methods, no callback: the ticker
    constants = runner_constants(model, max_len)
    clock.detail(f"to_edge_transform_and_lower of {', '.join(METHODS)}")
    edge = lower(programs, constants)
    delegation = delegation_report(edge)
    clock.detail("to_executorch (memory planning, quant fusion)")
    program = edge.to_executorch(_backend_config())
    clock.start("executorch: write .pte")
    path = staging.path(PTE_FILE)
    with open(path, "wb") as fh:
        program.write_to_file(fh)
    clock.start(None)
    return manifest_section(model, recipe, plan, constants, delegation, path.stat().st_size, max_len)


class _Steps:
    """Advances the pipeline's progress bar (three steps per target) and logs each step's duration."""

    def __init__(self, progress):
        self.progress, self.label, self.since = progress, None, time.perf_counter()

    def start(self, label: str | None) -> None:
        now = time.perf_counter()
        if self.label:
            log.debug("%s: %.1f s", self.label, now - self.since)
            if self.progress is not None:
                self.progress.update(1)
        if label and self.progress is not None:
            self.progress.set_postfix_str(label)
        self.label, self.since = label, now

    def detail(self, text: str) -> None:
        """What the step is doing now (a :class:`smoledge.progress.Progress` shows it beside the step)."""
        if self.progress is not None and hasattr(self.progress, "detail"):
            self.progress.detail(text)


def _require_executorch() -> None:
    try:
        import executorch.exir  # noqa: F401
        import torchao  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"the executorch exporter needs {err.name}, which is not installed",
                          hint=install_hint("executorch")) from None


def prepare_model(model, recipe: Recipe):
    """A quantized, export-ready copy of ``model`` and the torchao plan applied to it."""
    from smoledge.export.executorch_graphs import use_custom_attention
    from smoledge.export.executorch_passes import delegate_friendly_modules
    from smoledge.quantize.torchao_quant import torch_recipe

    prepared = copy.deepcopy(model).eval()
    plan = torch_recipe(recipe, prepared)
    plan.apply(prepared)
    delegate_friendly_modules(prepared)
    use_custom_attention(prepared)
    return prepared, plan


def export_methods(model, max_len: int) -> dict:
    """``torch.export`` of the three methods (batch 1; dynamic sequence length for prefill)."""
    import torch
    from torch.export import Dim
    from transformers.exporters.utils import apply_patches

    from smoledge.export.executorch_graphs import StaticCacheDecoder, TokenEmbeddingGraph, VisionTilesGraph
    from smoledge.export.executorch_passes import register_patches, rotation_buffer
    from smoledge.export.graphs import text_shape

    size = model.config.vision_config.image_size
    hidden = model.config.text_config.hidden_size
    seq = Dim("sequence_length", min=1, max=max_len)
    decoder = StaticCacheDecoder(model, max_len).eval()
    rotation_buffer(decoder, text_shape(model).head_dim)
    with torch.no_grad(), apply_patches(register_patches()):
        return {
            "vision_encoder": torch.export.export(VisionTilesGraph(model).eval(), (torch.randn(1, 3, size, size),),
                                                  strict=False),
            "token_embedding": torch.export.export(TokenEmbeddingGraph(model).eval(),
                                                   (torch.zeros((1, _SAMPLE_SEQ), dtype=torch.long),),
                                                   dynamic_shapes=({1: seq},), strict=False),
            "text_decoder": torch.export.export(decoder,
                                                (torch.randn(1, _SAMPLE_SEQ, hidden), torch.arange(_SAMPLE_SEQ)),
                                                dynamic_shapes=({1: seq}, {0: seq}), strict=False),
        }


def runner_constants(model, max_len: int) -> dict:
    """The constant methods ExecuTorch's LLM runners read (``extension/llm/runner/constants.h``)."""
    text, gen = model.config.text_config, model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos_ids = sorted({int(i) for i in [*eos, text.eos_token_id] if i is not None})
    bos = gen.bos_token_id if gen.bos_token_id is not None else text.bos_token_id
    return {
        "get_max_seq_len": max_len, "get_max_context_len": max_len, "get_vocab_size": int(text.vocab_size),
        "get_bos_id": int(bos if bos is not None else -1), "get_eos_ids": eos_ids,
        "use_kv_cache": True, "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True,
    }


def lower(programs: dict, constants: dict):
    """ATen -> edge dialect, XNNPACK-delegated; ``_check_ir_validity`` is off because the program
    legitimately holds non-core ops (``llama::custom_sdpa``, torchao's ``dequantize_affine``)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from smoledge.export.executorch_passes import delegate_friendly_views

    return to_edge_transform_and_lower(
        programs, transform_passes=[delegate_friendly_views],
        partitioner={name: [XnnpackPartitioner()] for name in DELEGATED},
        constant_methods=constants, compile_config=EdgeCompileConfig(_check_ir_validity=False))


def _backend_config():
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass

    return ExecutorchBackendConfig(extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
                                   memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False))


# Not kernels: tuple access, symbolic-int arithmetic (Python operators, no "." in the name) and shape asserts.
_BOOKKEEPING = ("getitem", "sym_size", "_local_scalar_dense", "_assert_scalar")


def _op_name(node) -> str:
    if getattr(node.target, "__name__", "").startswith("auto_functionalized"):  # an in-place custom op (the
        return str(node.args[0])  # KV cache's llama.update_cache), wrapped until to_executorch re-inplaces it
    return (getattr(node.target, "__name__", None) or str(node.target)).removeprefix("aten.")


def _is_bookkeeping(op: str) -> bool:
    return "." not in op or op.split(".")[0] in _BOOKKEEPING


def delegation_report(edge) -> dict:
    """Per method: how many XNNPACK partitions and which ops run outside them (portable/custom kernels)."""
    report = {}
    for name in METHODS:
        graph = edge.exported_program(name).graph_module.graph
        ops = Counter(_op_name(n) for n in graph.nodes if n.op == "call_function")
        partitions = ops.pop("executorch_call_delegate", 0)
        outside = {op: n for op, n in sorted(ops.items()) if not _is_bookkeeping(op)}
        report[name] = {"xnnpack_partitions": partitions, "outside_delegate": outside}
    return report


def method_specs(model) -> dict[str, Graph]:
    """The three graphs: methods of the one ``.pte``, under their logical names."""
    text, vision = model.config.text_config, model.config.vision_config
    size, hidden = vision.image_size, text.hidden_size
    tokens = ((size // vision.patch_size) // model.config.scale_factor) ** 2
    io = {
        "vision_encoder": ({"pixel_values": ([1, 3, size, size], "float32")},
                           {"image_features": ([1, tokens, hidden], "float32")}),
        "embed_tokens": ({"input_ids": ([1, "sequence_length"], "int64")},
                         {"inputs_embeds": ([1, "sequence_length", hidden], "float32")}),
        "decoder": ({"inputs_embeds": ([1, "sequence_length", hidden], "float32"),
                     "cache_position": (["sequence_length"], "int64")},
                    {"logits": ([1, text.vocab_size], "float32")}),
    }
    return {name: Graph(file=PTE_FILE, method=METHOD_OF[name], files=(PTE_FILE,), inputs=_tensors(inputs),
                        outputs=_tensors(outputs), states={}, dims={}, precision=None, bytes=None, quantization=None)
            for name, (inputs, outputs) in io.items()}


def _tensors(specs: dict) -> dict[str, Tensor]:
    return {name: Tensor(tuple(shape), dtype) for name, (shape, dtype) in specs.items()}


def manifest_section(model, recipe: Recipe, plan, constants: dict, delegation: dict, size: int,
                     max_len: int) -> ExecutorchArtifact:
    import executorch.version
    import torchao

    quant = plan.to_dict()
    used = [label for label, count in quant["schemes"].items() if count and label != "float32"]
    precision = "+".join(sorted(used)) + ("+fp32" if quant["schemes"].get("float32") else "") if used else "fp32"
    return ExecutorchArtifact(
        format=FORMAT, graphs=method_specs(model), context_capacity=max_len, recipe=recipe.to_dict(),
        weight_bytes=size, constant_methods=constants,
        kv_cache={"dtype": "float32", "layout": "per layer [1, context_capacity, kv_heads, head_dim], inside the "
                  "program", "ops": ["llama::update_cache", "llama::custom_sdpa"]},
        delegate={"backend": "xnnpack", "methods": delegation}, quantization=quant, precision=precision, bytes=size,
        runtime={"executorch_min": "1.5", "exported_with_executorch": executorch.version.__version__,
                 "exported_with_torchao": torchao.__version__, "kernel_libraries": list(KERNEL_LIBRARIES),
                 "tokenizer": "tokenizer.json (Hugging Face tokenizers JSON; ExecuTorch's HFTokenizer reads it)"})
