"""Apply a calibrated scheme (gptq / importance) to the MatMul nodes a recipe rule matched."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from smoledge.errors import ConfigError
from smoledge.quantize.algorithms.gptq import gptq
from smoledge.quantize.algorithms.grid import Grid, matmul_nbits_node, search_grid, to_blocks


def quantize_weight(weight: np.ndarray, scheme, hessian: np.ndarray) -> tuple[np.ndarray, object]:
    """W [K, N] -> (q [N, k_blocks, block], grid) by the scheme's algorithm."""
    block = scheme.block_size
    blocks = to_blocks(weight, block)
    importance = np.zeros(blocks.shape[1] * block, np.float32)
    importance[: weight.shape[0]] = np.diag(hessian)
    # a floor keeps channels the calibration text never excited from being rounded arbitrarily
    importance = np.maximum(importance, 1e-3 * importance.mean()).reshape(blocks.shape[1], block)
    grid = search_grid(blocks, importance, scheme.bits, scheme.symmetric)
    if scheme.algorithm == "gptq":
        return gptq(weight, hessian, grid, damp=scheme.damp, act_order=scheme.act_order), grid
    return grid.quantize(blocks), grid


def _by_input(nodes: dict[str, onnx.NodeProto], stats) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for name, node in nodes.items():
        if node.op_type != "MatMul":
            raise ConfigError(f"calibrated quantization takes linear layers only, not {name} ({node.op_type})",
                              hint="give embeddings an rtn rule before the calibrated one")
        if stats.hessian(name) is None:
            raise ConfigError(f"no calibration activations for {name}",
                              hint="calibrated schemes apply to the text decoder's linears and lm_head only")
        groups.setdefault(node.input[0], []).append(name)
    return list(groups.values())


def apply_calibrated(model: onnx.ModelProto, nodes: dict[str, onnx.NodeProto], scheme, stats) -> onnx.ModelProto:
    if stats is None:
        raise ConfigError(f"the {scheme.algorithm} scheme needs calibration activations and none were collected",
                          hint="export through `smoledge export` (it runs the fp32 model on the calibration text)")
    inits = {i.name: i for i in model.graph.initializer}
    replaced: dict[str, tuple[onnx.NodeProto, list]] = {}
    for group in _by_input(nodes, stats):
        # linears reading one tensor (q/k/v, gate/up) share a Hessian: quantize them side by side
        weights = [numpy_helper.to_array(inits[nodes[n].input[1]]).astype(np.float32) for n in group]
        q, grid = quantize_weight(np.concatenate(weights, axis=1), scheme, stats.hessian(group[0]))
        start = 0
        for name, weight in zip(group, weights):
            stop = start + weight.shape[1]
            part = Grid(grid.scale[start:stop], grid.zero[start:stop], grid.bits, grid.block_size, grid.symmetric)
            replaced[name] = matmul_nbits_node(nodes[name], weight.shape[0], q[start:stop], part,
                                               scheme.accuracy_level)
            start = stop
    new_nodes = [replaced[n.name][0] if n.name in replaced else n for n in model.graph.node]
    model.graph.ClearField("node")
    model.graph.node.extend(new_nodes)
    for _, new_inits in replaced.values():
        model.graph.initializer.extend(new_inits)
    still_read = {i for n in model.graph.node for i in n.input}
    gone = {nodes[n].input[1] for n in replaced} - still_read
    keep = [i for i in model.graph.initializer if i.name not in gone]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(keep)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model
