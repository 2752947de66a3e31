"""GPTQ (Frantar et al. 2022) on a fixed per-block grid.

Columns of ``W`` (input channels) are rounded one at a time on the grid chosen beforehand by
:func:`~smoledge.quantize.algorithms.grid.search_grid` ("static groups"), and each rounding error is
spread over the not yet rounded columns through the inverse Hessian ``H = X^T X`` of the calibration
activations.  With ``act_order`` the columns are taken loudest first (descending ``diag(H)``), so the
channels that matter most are rounded while the most columns are left to absorb their error; the grid
stays the one of each column's own block, so the integers still lie exactly on it and pack straight
into ``MatMulNBits`` (onnxruntime's own GPTQ re-derives min/max grids after compensation instead, see
docs/quantization.md).
"""

from __future__ import annotations

import numpy as np

from smoledge.quantize.algorithms.grid import Grid

_COLUMNS_PER_STEP = 32


def _inverse_cholesky(gram: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor of the damped inverse Hessian, mask of channels never excited)."""
    hess = gram.astype(np.float64).copy()
    dead = np.diag(hess) == 0
    hess[dead, dead] = 1.0
    hess[np.diag_indices(len(hess))] += damp * np.mean(np.diag(hess))
    return np.linalg.cholesky(np.linalg.inv(hess)).T.astype(np.float32), dead


def gptq(weight: np.ndarray, gram: np.ndarray, grid: Grid, damp: float = 0.01, act_order: bool = False
         ) -> np.ndarray:
    """weight W [K, N] (``x @ W``), gram H [K, K]; returns q uint8 [N, k_blocks, block] on ``grid``."""
    k, n = weight.shape
    block = grid.block_size
    order = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(k)
    w = weight.T[:, order].astype(np.float32)  # [N, K]: one column per input channel, in rounding order
    hinv, dead = _inverse_cholesky(gram[np.ix_(order, order)], damp)
    w[:, dead] = 0.0
    scale, zero = grid.scale.astype(np.float32), grid.zero.astype(np.float32)
    group = order // block
    qmax = 2 ** grid.bits - 1
    q_all = np.empty((n, k), np.uint8)
    for start in range(0, k, _COLUMNS_PER_STEP):
        stop = min(start + _COLUMNS_PER_STEP, k)
        chunk, hchunk = w[:, start:stop].copy(), hinv[start:stop, start:stop]
        errors = np.zeros_like(chunk)
        for i in range(stop - start):
            g = group[start + i]
            col = chunk[:, i]
            q = np.clip(np.rint(col / scale[:, g]) + zero[:, g], 0, qmax)
            q_all[:, start + i] = q
            err = (col - (q - zero[:, g]) * scale[:, g]) / hchunk[i, i]
            chunk[:, i:] -= np.outer(err, hchunk[i, i:])
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    k_blocks = grid.scale.shape[1]
    padded = np.empty((n, k_blocks * block), np.uint8)
    padded[:, order] = q_all
    padded[:, k:] = grid.zero[:, -1:]  # padding dequantizes to 0
    return padded.reshape(n, k_blocks, block)
