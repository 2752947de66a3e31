"""Capture the Core ML wrappers and convert them with ``coremltools.convert`` (iOS 18, fp16 compute).

Each ``convert_*`` returns the in-memory ``MLModel`` (not loaded: Core ML itself only exists on Apple
platforms), the torch module it came from, and its I/O description for the manifest.  Flexible lengths
are ``ct.RangeDim`` s named ``query`` (tokens in this call) and ``total`` (tokens in the cache after
it), both ``1..capacity``; the manifest writes them as those names, with their ranges under ``dims``.

:func:`weight_names` maps the program's weight constants back to HF parameter names (what recipe rules
match) by value: coremltools names constants after TorchScript / torch.export attributes in ways that
differ between the two capture paths, but a constant's fp16 bytes are the parameter's fp16 bytes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from smoledge.export.coreml_graphs import (KEY_CACHE, VALUE_CACHE, CoreMLEmbedTokens, CoreMLVisionEncoder,
                                           StatefulDecoder, additive_causal_mask)
from smoledge.export.graphs import text_shape
from smoledge.quantize.coreml_quant import WEIGHT_OPS

log = logging.getLogger(__name__)

QUERY, TOTAL = "query", "total"


@dataclass
class Converted:
    mlmodel: object
    module: torch.nn.Module
    inputs: dict
    outputs: dict
    states: dict = field(default_factory=dict)
    dims: dict = field(default_factory=dict)

    def io(self) -> dict:
        return {"inputs": self.inputs, "outputs": self.outputs, "states": self.states, "dims": self.dims}


def _tensor(shape, dtype: str) -> dict:
    return {"shape": list(shape), "dtype": dtype}


def _convert(program, inputs, outputs, states=None):
    import coremltools as ct

    return ct.convert(program, inputs=inputs, outputs=outputs, states=states or None, convert_to="mlprogram",
                      minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                      skip_model_load=True)


def convert_vision(model, capacity: int | None = None) -> Converted:
    """One full tile; ``capacity`` (the decoder's) does not apply."""
    import coremltools as ct

    module = CoreMLVisionEncoder(model).eval()
    side = model.config.vision_config.image_size
    with torch.no_grad():
        program = torch.export.export(module, (torch.zeros(1, 3, side, side),)).run_decompositions({})
    mlmodel = _convert(program, [ct.TensorType("pixel_values", shape=(1, 3, side, side), dtype=np.float16)],
                       [ct.TensorType("image_features", dtype=np.float16)])
    with torch.no_grad():
        seq, hidden = module(torch.zeros(1, 3, side, side)).shape[1:]
    return Converted(mlmodel, module, {"pixel_values": _tensor((1, 3, side, side), "float16")},
                     {"image_features": _tensor((1, seq, hidden), "float16")})


def convert_embed(model, capacity: int) -> Converted:
    import coremltools as ct

    module = CoreMLEmbedTokens(model).eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, (torch.zeros(1, 2, dtype=torch.int32),))
    query = ct.RangeDim(1, capacity, default=1, symbol=QUERY)
    mlmodel = _convert(traced, [ct.TensorType("input_ids", shape=(1, query), dtype=np.int32)],
                       [ct.TensorType("inputs_embeds", dtype=np.float16)])
    hidden = text_shape(model).hidden_size
    return Converted(mlmodel, module, {"input_ids": _tensor((1, QUERY), "int32")},
                     {"inputs_embeds": _tensor((1, QUERY, hidden), "float16")}, dims={QUERY: [1, capacity]})


def convert_decoder(model, capacity: int) -> Converted:
    import coremltools as ct

    module = StatefulDecoder(model, capacity).eval()
    shape = text_shape(model)
    example = (torch.zeros(1, 2, shape.hidden_size), torch.arange(2, dtype=torch.int32)[None],
               additive_causal_mask(0, 2))
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
    module.reset()
    query = ct.RangeDim(1, capacity, default=1, symbol=QUERY)
    total = ct.RangeDim(1, capacity, default=1, symbol=TOTAL)
    cache_shape = tuple(module.key_cache.shape)
    inputs = [ct.TensorType("inputs_embeds", shape=(1, query, shape.hidden_size), dtype=np.float16),
              ct.TensorType("position_ids", shape=(1, query), dtype=np.int32),
              ct.TensorType("causal_mask", shape=(1, 1, query, total), dtype=np.float16)]
    states = [ct.StateType(ct.TensorType(shape=cache_shape, dtype=np.float16), name=name)
              for name in (KEY_CACHE, VALUE_CACHE)]
    mlmodel = _convert(traced, inputs, [ct.TensorType("logits", dtype=np.float16)], states)
    return Converted(
        mlmodel, module,
        inputs={"inputs_embeds": _tensor((1, QUERY, shape.hidden_size), "float16"),
                "position_ids": _tensor((1, QUERY), "int32"),
                "causal_mask": _tensor((1, 1, QUERY, TOTAL), "float16")},
        outputs={"logits": _tensor((1, QUERY, shape.vocab_size), "float16")},
        states={name: _tensor(cache_shape, "float16") for name in (KEY_CACHE, VALUE_CACHE)},
        dims={QUERY: [1, capacity], TOTAL: [1, capacity]},
    )


CONVERTERS = {"vision_encoder": convert_vision, "embed_tokens": convert_embed, "decoder": convert_decoder}


# --------------------------------------------------------------------------- weight names


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float16)
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()


def hf_parameter_names(module: torch.nn.Module, model) -> dict[str, str]:
    """The wrapper's 2-D parameters by fp16 digest -> HF name without ``.weight`` (as recipe rules match).

    Names come from the owning module, not the parameter: a tied weight (SmolLM2's embedding and
    lm_head) is one parameter under two modules, and each wrapper holds exactly one of them."""
    hf_modules = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    names = {}
    for local, param in module.named_parameters(remove_duplicate=False):
        owner_path, _, attr = local.rpartition(".")
        owner = hf_modules.get(id(module.get_submodule(owner_path)))
        if param.dim() == 2 and owner is not None and attr == "weight":
            names.setdefault(_digest(param.detach().float().numpy()), owner)
    return names


def weight_constants(program) -> list:
    """The const ops that feed a weight input (linear weight, gather table) of the main function."""
    found = {}
    for op in program.functions["main"].operations:
        slot = WEIGHT_OPS.get(op.op_type)
        var = getattr(op, slot, None) if slot else None
        if var is not None and var.op is not None and var.op.op_type == "const" and var.rank == 2:
            found[var.op.name] = var.op
    return list(found.values())


def weight_names(program, module: torch.nn.Module, model) -> dict[str, str]:
    """{const op name: HF weight name} for every weight constant that is an HF parameter."""
    hf = hf_parameter_names(module, model)
    names = {}
    for op in weight_constants(program):
        name = hf.get(_digest(op.outputs[0].val))
        if name is not None:
            names[op.name] = name
        elif any(child.op_type == "linear" for child in op.outputs[0].child_ops):
            log.warning("coreml: linear weight %s matches no HF parameter; it stays fp16", op.name)
    return names
