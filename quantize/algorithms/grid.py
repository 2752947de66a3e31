"""Block grids for ``MatMulNBits``: choose scales (and integer zero points), quantize, pack.

Layout follows the ONNX weight ``W[K, N]`` (``x @ W``): blocks of ``block_size`` run along K for each
output column n, exactly as ``MatMulNBits`` stores them (``B[N, k_blocks, block_size * bits / 8]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

# Candidate grids per block, as multiples of the plain max/min grid's step: llama.cpp's make_qx_quants
# tries iscale = (nmax + 0.1 * i) / max for i in -9..9 (a little coarser to a little clipped); the rest
# clip the largest weights further (down to 0.7 of the range).  Each candidate's integers then get the
# weighted least-squares scale, and the search keeps the smallest weighted error.
_STEPS = tuple(sorted({round(1 + 0.1 * i / 8, 4) for i in range(-9, 10)} | {round(1 / s, 4) for s in
                                                                           np.linspace(0.70, 0.9, 6)}))


@dataclass(frozen=True)
class Grid:
    """Per (n, block): ``w ~ scale * (q - zero)``, q in [0, 2**bits - 1]."""

    scale: np.ndarray  # [N, k_blocks] float32
    zero: np.ndarray  # [N, k_blocks] uint8 (2**(bits-1) everywhere when symmetric)
    bits: int
    block_size: int
    symmetric: bool

    def quantize(self, blocks: np.ndarray) -> np.ndarray:
        """blocks [N, k_blocks, block] -> q uint8 of the same shape."""
        qmax = 2 ** self.bits - 1
        q = np.rint(blocks / self.scale[..., None]) + self.zero[..., None].astype(np.float32)
        return np.clip(q, 0, qmax).astype(np.uint8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (q.astype(np.float32) - self.zero[..., None]) * self.scale[..., None]


def to_blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """W [K, N] -> [N, k_blocks, block] (zero-padded along K)."""
    k, n = weight.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((k_blocks * block_size, n), np.float32)
    padded[:k] = weight
    return padded.T.reshape(n, k_blocks, block_size)


def search_grid(blocks: np.ndarray, importance: np.ndarray | None, bits: int, symmetric: bool) -> Grid:
    """The per-block grid minimising sum(weight * (w - dequant(quant(w)))**2) over the candidate steps.

    The weight of each entry is llama.cpp's for an imatrix: ``importance`` of its input channel
    ([k_blocks, block], the mean square activation; None: all equal) times ``sqrt(sigma2 + w**2)``
    (sigma2: the block's mean square weight), so large weights and loud channels are kept closest.
    Symmetric grids have no zero point (MatMulNBits' default 2**(bits-1)) and a signed scale that puts the
    block's extreme weight on the grid's longer side (-2**(bits-1)), as llama.cpp's Q4_0 does;
    asymmetric ones an integer zero point.
    """
    import torch

    n, k_blocks, block = blocks.shape
    imp = torch.ones((k_blocks, block)) if importance is None else torch.from_numpy(importance.astype(np.float32))
    data = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.float32))
    scale_out = torch.empty((n, k_blocks), dtype=torch.float32)
    zero_out = torch.empty((n, k_blocks), dtype=torch.uint8)
    rows = max(1, _SEARCH_ELEMENTS // (k_blocks * block))
    with torch.no_grad():
        for r0 in range(0, n, rows):
            scale_out[r0:r0 + rows], zero_out[r0:r0 + rows] = _search_rows(data[r0:r0 + rows], imp, bits, symmetric)
    return Grid(scale_out.numpy(), zero_out.numpy(), bits, block, symmetric)


_SEARCH_ELEMENTS = 1 << 20  # weights per slice of rows: the search's temporaries stay in cache-sized pieces


def _search_rows(blocks, imp, bits: int, symmetric: bool):
    """search_grid on a slice of rows (torch [rows, k_blocks, block]).

    For integers c = q - zero and scale s the weighted error is ``A - (2 s num - s^2 den)`` with
    ``num = sum(weight c w)``, ``den = sum(weight c^2)`` and ``A = sum(weight w^2)`` the same for every
    candidate, so only the gain ``2 s num - s^2 den`` is compared (s: the least-squares ``num / den``)."""
    import torch

    weight = imp[None] * torch.sqrt((blocks * blocks).mean(-1, keepdim=True) + blocks * blocks)
    weighted = weight * blocks
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    best_gain = torch.full(lo.shape, -torch.inf)
    best_scale = torch.ones(lo.shape)
    best_zero = torch.full(lo.shape, float(2 ** (bits - 1)))
    qmax = float(2 ** bits - 1)
    for step in _STEPS:
        scale, zero = _candidate_torch(lo / step, hi / step, bits, symmetric)
        c = torch.clamp(torch.round(blocks / scale[..., None]) + zero[..., None], 0.0, qmax) - zero[..., None]
        # for these integers the weighted least-squares scale is never worse than the candidate's own
        num = (c * weighted).sum(-1)
        den = (c * c * weight).sum(-1)
        s = torch.where(den > 0, num / torch.clamp(den, min=1e-30), scale)
        s = torch.where(s != 0, s, scale)
        gain = 2 * s * num - s * s * den
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best_scale = torch.where(better, s, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero.to(torch.uint8)


def _candidate_torch(lo, hi, bits: int, symmetric: bool):
    """:func:`_candidate` in torch (scale, zero as float)."""
    import torch

    if symmetric:
        half = float(2 ** (bits - 1))
        extreme = torch.where(-lo >= hi, lo, hi)
        scale = torch.where(extreme != 0, -extreme / half, torch.ones_like(extreme))
        return scale, torch.full_like(lo, half)
    qmax = float(2 ** bits - 1)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
    return scale, torch.clamp(torch.round(-lo / scale), 0.0, qmax)


def _candidate(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    qmax = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        # the signed extreme maps to -half (the grid's longer side) by a signed scale, as llama.cpp's Q4_0
        extreme = np.where(-lo >= hi, lo, hi)
        scale = np.where(extreme != 0, -extreme / half, 1.0).astype(np.float32)
        return scale, np.full(lo.shape, half, np.uint8)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = np.where(hi > lo, (hi - lo) / qmax, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.uint8)
    return scale, zero


def matmul_nbits_node(node: onnx.NodeProto, k: int, q: np.ndarray, grid: Grid, accuracy_level: int
                      ) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A ``com.microsoft.MatMulNBits`` node (+ its initializers) replacing MatMul ``node``."""
    n, k_blocks, block = q.shape
    weight = node.input[1]
    if grid.bits == 4:
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    else:
        packed = q.astype(np.uint8)
    inits = [onnx.numpy_helper.from_array(packed, f"{weight}_Q{grid.bits}"),
             onnx.numpy_helper.from_array(grid.scale.astype(np.float32).reshape(-1), f"{weight}_scales")]
    inputs = [node.input[0], inits[0].name, inits[1].name]
    if not grid.symmetric:
        zero = grid.zero
        if grid.bits == 4:  # two per byte, each row padded to whole bytes
            if k_blocks % 2:
                zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], axis=1)
            zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
        inits.append(onnx.numpy_helper.from_array(zero.astype(np.uint8).reshape(-1), f"{weight}_zero_points"))
        inputs.append(inits[-1].name)
    new = onnx.helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{grid.bits}",
                                domain="com.microsoft", K=k, N=n, bits=grid.bits, block_size=block,
                                accuracy_level=accuracy_level)
    return new, inits
