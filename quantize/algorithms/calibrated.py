"""Apply a calibrated scheme (gptq / importance) to the MatMul nodes a recipe rule matched.

Each weight group's result (integers + grid) is cached under ``<smoledge cache>/quant/``, keyed by the
sha256 of everything it is a function of: the weights' bytes, the Hessian's bytes (so the checkpoint and
the calibration text), the scheme's fields and :data:`ALGORITHM_VERSION`; a second export of the same
checkpoint with the same recipe reads it back instead of searching and compensating again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from smoledge.errors import ConfigError
from smoledge.quantize.algorithms.gptq import gptq
from smoledge.quantize.algorithms.grid import Grid, matmul_nbits_node, search_grid, to_blocks
from smoledge.quantize.calibration import one_thread
from smoledge.quantize.recipe import whole_weight_name

log = logging.getLogger(__name__)

# bump when grid.py / gptq.py change what they compute: cached results of an older version are not read
ALGORITHM_VERSION = 1
CACHE_ENV = "SMOLEDGE_QUANT_CACHE"  # "0": neither read nor write the cache


def cache_root() -> Path | None:
    if os.environ.get(CACHE_ENV, "1") == "0":
        return None
    from smoledge.runtime.cache import cache_path

    return cache_path("quant")


def _cache_key(weight: np.ndarray, scheme, stats, name: str) -> str:
    """sha256 of the weights, the scheme and what the Hessian is a function of: the calibration's
    ``source`` (model + text) and the layer's name, or the Hessian's own bytes when the source is unknown."""
    digest = hashlib.sha256(json.dumps({"version": ALGORITHM_VERSION, "scheme": asdict(scheme)},
                                       sort_keys=True).encode())
    digest.update(str((weight.shape, weight.dtype.str)).encode())
    digest.update(np.ascontiguousarray(weight).data)
    if stats.source:
        digest.update(f"{stats.source}:{name}".encode())
    else:
        digest.update(np.ascontiguousarray(stats.hessian(whole_weight_name(name))).data)
    return digest.hexdigest()


def _load_cached(path: Path, scheme) -> tuple[np.ndarray, Grid] | None:
    try:
        with np.load(path) as data:
            q, scale, zero = data["q"], data["scale"], data["zero"]
    except (OSError, KeyError, ValueError):
        return None
    if scheme.bits == 4:  # two integers a byte on disk
        q = np.stack([q & 15, q >> 4], axis=-1).reshape(*q.shape[:-1], -1)
    return q, Grid(scale, zero, scheme.bits, scheme.block_size, scheme.symmetric)


def _store(path: Path, q: np.ndarray, grid: Grid) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        packed = q[..., 0::2] | (q[..., 1::2] << 4) if grid.bits == 4 else q
        np.savez(tmp, q=packed, scale=grid.scale, zero=grid.zero)
        os.replace(tmp, path)
    except OSError as err:  # a read-only or full cache costs the next export time, never this one
        log.debug("quantization cache not written: %s", err)


def quantize_weight_cached(weight: np.ndarray, scheme, stats, name: str) -> tuple[np.ndarray, Grid]:
    """:func:`quantize_weight` with layer ``name``'s Hessian, read from / written to the quantization cache."""
    root = cache_root()
    path = None if root is None else root / f"{_cache_key(weight, scheme, stats, name)}.npz"
    if path is not None and path.is_file() and (hit := _load_cached(path, scheme)) is not None:
        return hit
    with one_thread():  # rows of a weight split by a rows rule read the whole weight's Hessian (one input)
        q, grid = quantize_weight(weight, scheme, stats.hessian(whole_weight_name(name)))
    if path is not None:
        _store(path, q, grid)
    return q, grid


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
        if not stats.has(whole_weight_name(name)):
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
        weights = [numpy_helper.to_array(inits[nodes[n].input[1]]).astype(np.float32, copy=False) for n in group]
        joined = weights[0] if len(weights) == 1 else np.concatenate(weights, axis=1)  # no copy of lm_head
        q, grid = quantize_weight_cached(joined, scheme, stats, group[0])
        del joined
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
