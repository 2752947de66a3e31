"""GPTQ (Frantar et al. 2022) on a fixed per-block grid.

Columns of ``W`` (input channels) are rounded one at a time on the grid chosen beforehand by
:func:`~smoledge.quantize.algorithms.grid.search_grid` ("static groups"), and each rounding error is
spread over the not yet rounded columns through the inverse Hessian ``H = X^T X`` of the calibration
activations.  The integers it returns lie exactly on that grid, so they pack straight into
``MatMulNBits`` (onnxruntime's own GPTQ re-derives min/max grids after compensation instead, see
docs/quantization.md).
"""

from __future__ import annotations

import numpy as np

from smoledge.quantize.algorithms.grid import Grid

_COLUMNS_PER_STEP = 32


def gptq(weight: np.ndarray, gram: np.ndarray, grid: Grid, damp: float = 0.01) -> np.ndarray:
    """weight W [K, N] (``x @ W``), gram H [K, K]; returns q uint8 [N, k_blocks, block] on ``grid``."""
    k, n = weight.shape
    block = grid.block_size
    w = weight.T.astype(np.float32)  # [N, K]: one column per input channel (a copy)
    hess = gram.astype(np.float64).copy()
    dead = np.diag(hess) == 0
    hess[dead, dead] = 1.0
    w[:, dead] = 0.0
    hess[np.diag_indices(k)] += damp * np.mean(np.diag(hess))
    hinv = np.linalg.cholesky(np.linalg.inv(hess)).T.astype(np.float32)  # upper triangular
    scale, zero = grid.scale.astype(np.float32), grid.zero.astype(np.float32)
    qmax = 2 ** grid.bits - 1
    q_all = np.empty((n, k), np.uint8)
    for start in range(0, k, _COLUMNS_PER_STEP):
        stop = min(start + _COLUMNS_PER_STEP, k)
        chunk, hchunk = w[:, start:stop].copy(), hinv[start:stop, start:stop]
        errors = np.zeros_like(chunk)
        for i in range(stop - start):
            g = (start + i) // block
            col = chunk[:, i]
            q = np.clip(np.rint(col / scale[:, g]) + zero[:, g], 0, qmax)
            q_all[:, start + i] = q
            err = (col - (q - zero[:, g]) * scale[:, g]) / hchunk[i, i]
            chunk[:, i:] -= np.outer(err, hchunk[i, i:])
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    k_blocks = grid.scale.shape[1]
    padded = np.empty((n, k_blocks * block), np.uint8)
    padded[:, :k] = q_all
    padded[:, k:] = grid.zero[:, -1:]  # padding dequantizes to 0
    return padded.reshape(n, k_blocks, block)
