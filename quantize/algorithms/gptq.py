"""GPTQ (Frantar et al. 2022) on a fixed per-block grid.

Columns of ``W`` (input channels) are rounded one at a time on the grid chosen beforehand by
:func:`~smoledge.quantize.algorithms.grid.search_grid` ("static groups"), and each rounding error is
spread over the not yet rounded columns through the inverse Hessian ``H = X^T X`` of the calibration
activations.  With ``act_order`` the columns are taken loudest first (descending ``diag(H)``), so the
channels that matter most are rounded while the most columns are left to absorb their error; the grid
stays the one of each column's own block, so the integers still lie exactly on it and pack straight
into ``MatMulNBits`` (onnxruntime's own GPTQ re-derives min/max grids after compensation instead, see
docs/quantization.md).

torch, on the transposed weight ``W[K, N]`` so each input channel is one contiguous row: the per-channel
step is a handful of vector ops over N outputs, and the error of each lazy batch reaches the remaining
channels through one matrix product.
"""

from __future__ import annotations

import numpy as np

from smoledge.quantize.algorithms.grid import Grid

_COLUMNS_PER_STEP = 64


def _inverse_cholesky(gram: np.ndarray, damp: float):
    """(upper Cholesky factor of the damped inverse Hessian as float32 torch, mask of channels never excited);
    overwrites ``gram``."""
    import torch

    # ``gram`` is the caller's scratch copy: damped in place, and each fp64 K x K step frees the one before
    # (down_proj's 8192^2 is 537 MB a copy at 2.2B)
    hess = torch.from_numpy(gram.astype(np.float64, copy=False))
    dead = torch.diagonal(hess) == 0
    hess[dead, dead] = 1.0
    hess.diagonal().add_(damp * float(torch.diagonal(hess).mean()))
    factor = torch.linalg.cholesky(hess)
    del hess
    inverse = torch.cholesky_inverse(factor)
    del factor
    return torch.linalg.cholesky(inverse, upper=True).float(), dead.numpy()


def gptq(weight: np.ndarray, gram: np.ndarray, grid: Grid, damp: float = 0.01, act_order: bool = False
         ) -> np.ndarray:
    """weight W [K, N] (``x @ W``), gram H [K, K]; returns q uint8 [N, k_blocks, block] on ``grid``."""
    import torch

    k, n = weight.shape
    block = grid.block_size
    order = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(k)
    hinv, dead = _inverse_cholesky(gram[np.ix_(order, order)], damp)
    w = torch.from_numpy(np.ascontiguousarray(weight[order], dtype=np.float32))  # [K, N] in rounding order
    w[torch.from_numpy(dead)] = 0.0
    group = (order // block).tolist()  # each rounded channel's block: its row of the [k_blocks, N] grid
    scale = torch.from_numpy(np.ascontiguousarray(grid.scale.T, dtype=np.float32))
    zero = torch.from_numpy(np.ascontiguousarray(grid.zero.T, dtype=np.float32))
    qmax = float(2 ** grid.bits - 1)
    q_all = torch.empty((k, n), dtype=torch.uint8)  # integers in [0, qmax], stored exactly
    with torch.no_grad():
        for start in range(0, k, _COLUMNS_PER_STEP):
            stop = min(start + _COLUMNS_PER_STEP, k)
            chunk, h = w[start:stop], hinv[start:stop, start:stop]
            for i in range(stop - start):
                row, s, z = chunk[i], scale[group[start + i]], zero[group[start + i]]
                q = torch.clamp(torch.round(row / s) + z, 0.0, qmax)
                q_all[start + i] = q
                err = (row - (q - z) * s) / h[i, i]
                chunk[i + 1:].addr_(h[i, i + 1:], err, alpha=-1.0)
                chunk[i] = err  # the row is done: keep its scaled error for the batch update
            if stop < k:
                w[stop:].addmm_(hinv[start:stop, stop:].T, chunk, alpha=-1.0)
    k_blocks = grid.scale.shape[1]
    padded = np.empty((n, k_blocks * block), np.uint8)
    padded[:, order] = q_all.numpy().T
    padded[:, k:] = grid.zero[:, -1:]  # padding dequantizes to 0
    return padded.reshape(n, k_blocks, block)
