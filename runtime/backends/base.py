"""What a backend is: three calls on numpy arrays.  Everything else (prompting, sampling, streaming)
is shared in :mod:`smoledge.runtime.generate` and :mod:`smoledge.runtime.pipeline`."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from smoledge.errors import ConfigError


class Backend(Protocol):
    """One loaded bundle format.  The KV cache is an opaque object the backend creates and advances."""

    name: str

    def encode_images(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray) -> np.ndarray:
        """[N,3,H,W] float32 + [N,H,W] bool -> image features [N, image_seq_len, hidden] float32."""

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """[1,S] int64 -> [1,S,hidden] float32."""

    def new_cache(self, max_length: int) -> Any:
        """An empty KV cache for one sequence of at most ``max_length`` tokens."""

    def step(self, inputs_embeds: np.ndarray, cache: Any) -> np.ndarray:
        """Run the decoder on [1,S,hidden] after what ``cache`` holds; advance the cache by S and
        return the last position's logits [vocab] float32."""


def backend_options(cls, backend: str, options: dict):
    """``cls(**options)``, where an option ``cls`` does not have (a device profile's ``backend_options`` reach a
    backend's ``load`` as given) is a ConfigError naming the backend's options."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"the {backend} backend has no option {', '.join(map(repr, unknown))}",
                          hint=f"its options: {', '.join(sorted(known))}")
    return cls(**options)
