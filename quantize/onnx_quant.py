"""Apply a :class:`~smoledge.quantize.recipe.Recipe` to an ONNX graph with onnxruntime's quantizer.

MatMul weights become ``MatMulNBits`` and the token embedding ``GatherBlockQuantized`` through
``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``: one pass per distinct scheme,
each restricted to the nodes its rule matched.  Node names are the HF module
names given by :func:`smoledge.export.onnx_export.name_weight_nodes`.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from smoledge.errors import ConfigError
from smoledge.quantize.algorithms.calibrated import apply_calibrated
from smoledge.quantize.calibration import CalibrationStats
from smoledge.quantize.recipe import QuantReport, Recipe, Scheme, row_part_name

log = logging.getLogger(__name__)


def _algo_config(scheme: Scheme, op_types: tuple[str, ...]):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if scheme.algorithm == "k-quant":
        return mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=op_types)
    if scheme.algorithm == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=scheme.block_size, bits=scheme.bits,
                                            op_types_to_quantize=op_types)
    return mnq.DefaultWeightOnlyQuantConfig(block_size=scheme.block_size, is_symmetric=scheme.symmetric,
                                            accuracy_level=scheme.accuracy_level, bits=scheme.bits,
                                            op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)))


def _weight_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    inits = {i.name for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        weight = node.input[1] if node.op_type == "MatMul" else node.input[0] if node.op_type == "Gather" else None
        if weight in inits:
            found[node.name] = node
    return found


def quantize_model(model: onnx.ModelProto, recipe: Recipe, calibration: CalibrationStats | None = None
                   ) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize ``model`` (weights loaded) as ``recipe`` says; returns the new model and a report of what
    the graph really holds afterwards (onnxruntime skips what it cannot do, e.g. an 8-bit Gather).

    Calibrated schemes (gptq, importance) read ``calibration`` (activations of the fp32 model on the
    recipe's calibration text) and are applied here; the others go through onnxruntime's quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    nodes = _weight_nodes(model)
    recipe = recipe.for_weights(nodes)
    weights = sum(_numel(model, n) for n in nodes.values())
    model, plan = split_rows(model, nodes, recipe)
    nodes = _weight_nodes(model)
    groups: dict[Scheme, list[str]] = defaultdict(list)
    for name in nodes:
        if (scheme := plan[name]) is not None:
            groups[scheme].append(name)
    asked: dict[str, Scheme] = {}
    for scheme, names in groups.items():
        if scheme.calibrated:
            model = apply_calibrated(model, {n: nodes[n] for n in names}, scheme, calibration)
            asked.update(dict.fromkeys(names, scheme))
            continue
        op_types = tuple(sorted({nodes[n].op_type for n in names}))
        # onnxruntime's nodes_to_include widens op_types_to_quantize rather than narrowing it: restrict
        # each pass by excluding every other weight node instead.
        others = [n for n in nodes if n not in set(names)]
        quantizer = MatMulNBitsQuantizer(model, block_size=scheme.block_size, is_symmetric=scheme.symmetric,
                                         accuracy_level=scheme.accuracy_level, nodes_to_exclude=others,
                                         algo_config=_algo_config(scheme, op_types))
        quantizer.process()
        model = quantizer.model.model
        asked.update(dict.fromkeys(names, scheme))
    counts = _count_outcomes(model, nodes, asked)
    return model, QuantReport(counts, weights, _weight_storage_bytes(model, set(nodes)))


def _weight_input(node: onnx.NodeProto) -> str:
    return node.input[1] if node.op_type == "MatMul" else node.input[0]


def _output_rows(node: onnx.NodeProto, weight: onnx.TensorProto) -> int:
    """The weight's HF output rows: N of a MatMul's ``[K, N]``, the vocabulary of a Gather's table."""
    return weight.dims[1] if node.op_type == "MatMul" else weight.dims[0]


def _row_parts(inits: dict[str, onnx.TensorProto], nodes: dict[str, onnx.NodeProto], recipe: Recipe
               ) -> dict[str, list[tuple[int, int, Scheme | None]]]:
    """:meth:`Recipe.parts_for` of every weight node (one part unless a ``rows`` rule splits it)."""
    return {name: recipe.parts_for(name, _output_rows(node, inits[_weight_input(node)])) for name, node in nodes.items()}


def _plan(parts: dict[str, list[tuple[int, int, Scheme | None]]]) -> dict[str, Scheme | None]:
    plan: dict[str, Scheme | None] = {}
    for name, split in parts.items():
        plan.update({name: split[0][2]} if len(split) == 1 else {row_part_name(name, a, b): s for a, b, s in split})
    return plan


def planned_schemes(model: onnx.ModelProto, recipe: Recipe) -> dict[str, Scheme | None]:
    """What :func:`quantize_model` will store each weight node (or row part, by :func:`row_part_name`) as,
    without changing the graph."""
    nodes = _weight_nodes(model)
    inits = {i.name: i for i in model.graph.initializer}
    return _plan(_row_parts(inits, nodes, recipe.for_weights(nodes)))


def split_rows(model: onnx.ModelProto, nodes: dict[str, onnx.NodeProto], recipe: Recipe
               ) -> tuple[onnx.ModelProto, dict[str, Scheme | None]]:
    """Each weight node's scheme (:func:`planned_schemes`), with every MatMul whose weight a ``rows`` rule
    splits replaced by one MatMul per part (over the columns of the ONNX ``[K, N]`` weight, named
    :func:`row_part_name`) and a Concat of their outputs along the last axis: the same product."""
    inits = {i.name: i for i in model.graph.initializer}
    parts = _row_parts(inits, nodes, recipe)
    replaced: dict[str, list[onnx.NodeProto]] = {}
    gone: set[str] = set()
    for name, split in parts.items():
        if len(split) == 1:
            continue
        node = nodes[name]
        if node.op_type != "MatMul":
            raise ConfigError(f"recipe {recipe.name!r} splits {name} ({node.op_type}) by rows; only linear "
                              "layers (MatMul) can be split", hint=f'drop the "rows" rule that matches {name}')
        weight = inits[_weight_input(node)]
        full = numpy_helper.to_array(weight)
        outputs, new = [], []
        for start, stop, _ in split:
            suffix = f".rows{start}_{stop}"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(full[:, start:stop]),
                                                                   weight.name + suffix))
            outputs.append(node.output[0] + suffix)
            new.append(onnx.helper.make_node("MatMul", [node.input[0], weight.name + suffix], [outputs[-1]],
                                             name=row_part_name(name, start, stop)))
        new.append(onnx.helper.make_node("Concat", outputs, list(node.output), name=f"{name}.concat", axis=-1))
        replaced[node.name] = new
        gone.add(weight.name)
    plan = _plan(parts)
    if not replaced:
        return model, plan
    new_nodes = [m for n in model.graph.node for m in replaced.get(n.name, [n])]
    model.graph.ClearField("node")
    model.graph.node.extend(new_nodes)
    keep = [i for i in model.graph.initializer if i.name not in gone]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(keep)
    return model, plan


_QUANT_OPS = ("MatMulNBits", "GatherBlockQuantized")


def _count_outcomes(model: onnx.ModelProto, original: dict, asked: dict[str, Scheme]) -> dict[str, int]:
    done = {n.name.removesuffix("_Q4").removesuffix("_Q8").removesuffix("_Q2") for n in model.graph.node
            if n.op_type in _QUANT_OPS}
    counts: dict[str, int] = defaultdict(int)
    for name in original:
        if name in done:
            counts[asked[name].label()] += 1
        else:
            if name in asked:
                log.warning("onnxruntime left %s unquantized (%s asked)", name, asked[name].label())
            counts["float"] += 1
    return dict(counts)


def _numel(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    name = _weight_input(node)
    init = next(i for i in model.graph.initializer if i.name == name)
    return int(np.prod(init.dims))


def _weight_storage_bytes(model: onnx.ModelProto, original_nodes: set[str]) -> int:
    """Bytes of every initializer read by a (possibly quantized) weight node: data + scales + zero points."""
    inits = {i.name: i for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        base = node.name.removesuffix("_Q4").removesuffix("_Q8").removesuffix("_Q2")
        if node.name not in original_nodes and base not in original_nodes:
            continue
        if node.op_type in ("MatMul", "MatMulNBits"):
            inputs = node.input[1:]
        elif node.op_type == "Gather":
            inputs = node.input[:1]
        else:  # GatherBlockQuantized: data, indices, scales, zero points
            inputs = [node.input[0], *node.input[2:]]
        total += sum(_tensor_bytes(inits[name]) for name in inputs if name in inits)
    return total


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (int(np.prod(tensor.dims)) + 1) // 2
    return int(np.prod(tensor.dims)) * itemsize
