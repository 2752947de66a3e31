"""Backends by bundle format, as the format registry (:mod:`smoledge.runtime.formats`) names them.  A
backend is one module exposing ``FORMAT`` and ``load(bundle, **options)``."""

from __future__ import annotations

import numpy as np

from smoledge.runtime.formats import FORMATS, format_spec

BACKENDS = {name: spec.backend for name, spec in FORMATS.items()}


def load_backend(name: str, bundle, **options):
    return format_spec(name).load_backend().load(bundle, **options)


def all_logits(backend, inputs_embeds: np.ndarray) -> np.ndarray:
    """Teacher-forced logits at every position of ``inputs_embeds`` [1,S,hidden] -> [S, vocab] float32, from a
    fresh cache: one decoder call where the backend offers ``all_logits``, else one step per position."""
    if hasattr(backend, "all_logits"):
        return np.asarray(backend.all_logits(inputs_embeds), dtype=np.float32)
    cache = backend.new_cache(inputs_embeds.shape[1])
    steps = [backend.step(inputs_embeds[:, i:i + 1], cache) for i in range(inputs_embeds.shape[1])]
    return np.stack(steps).astype(np.float32)
