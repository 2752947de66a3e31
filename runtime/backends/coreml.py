"""Core ML backend: the bundle's three ``.mlpackage`` s through ``coremltools`` on macOS 15+.

Everything the backend needs comes from the manifest's coreml section (``CoreMLArtifact``): package paths, input and
state names, the KV capacity and the attention-mask convention.  The KV cache is Core ML state
(``MLModel.make_state()``), advanced in place by each ``predict``; the backend only tracks its length
and sends ``position_ids`` and an additive ``causal_mask [1,1,S,P+S]`` with every call.

Core ML only runs on Apple platforms: :func:`load` refuses elsewhere with a one-line
:class:`~smoledge.errors.BackendUnavailableError`.  :class:`CoreMLBackend` itself takes any objects
with ``predict(inputs, state=None)`` and ``make_state()`` (coremltools' ``MLModel`` on a Mac), which is
how the test suite drives this code against a reference evaluator of the same packages on Linux.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from smoledge.errors import (BackendError, BackendUnavailableError, BundleError, ConfigError, InputError,
                             PromptTooLongError, install_hint)
from smoledge.runtime.backends.base import backend_options
from smoledge.runtime.bundle import Bundle

FORMAT = "coreml"
MODELS = ("vision_encoder", "embed_tokens", "decoder")
MIN_MACOS = (15, 0)
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


@dataclass
class CoreMLCache:
    state: Any
    length: int = 0
    max_length: int = 0


@dataclass(frozen=True)
class CoreMLOptions:
    compute_units: str = "ALL"


def package_paths(bundle: Bundle) -> dict:
    """Each model's package folder, after checking that the manifest lists its files inside the bundle."""
    section = bundle.artifact(FORMAT)
    paths = {}
    for name in MODELS:
        entry = section.graphs.get(name)
        if entry is None:
            raise BundleError(f"the bundle's coreml artifacts lack the {name} model", hint="re-export the bundle")
        for rel in entry.files:
            bundle.file(rel)
        paths[name] = (bundle.path / entry.file).resolve()
    return paths


class CoreMLBackend:
    name = FORMAT

    def __init__(self, bundle: Bundle, models: dict):
        self.section = bundle.artifact(FORMAT)
        self.models = models
        self.capacity = self.section.capacity(bundle.manifest.context_length)
        self.max_context_len = self.capacity  # the Pipeline (and the router) cap requests at the state's size
        self.masked = self.section.attention_mask.masked
        self.full_tiles_only = self.section.full_tiles_only

    def _predict(self, name: str, inputs: dict, state=None) -> dict:
        try:
            if state is None:
                return self.models[name].predict(inputs)
            return self.models[name].predict(inputs, state=state)
        except MemoryError:
            raise
        except Exception as err:  # Core ML raises untyped errors from its Objective-C layer
            raise BackendError(f"Core ML failed in {name}: {str(err).splitlines()[0][:200]}") from err

    def encode_images(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray) -> np.ndarray:
        if self.full_tiles_only and not np.all(pixel_attention_mask):
            raise InputError("the Core ML vision encoder takes full tiles only, and this image has padded ones",
                             hint="use the runtime's own preprocessing, which never pads a SmolVLM tile")
        tiles = [self._predict("vision_encoder", {"pixel_values": tile[None].astype(np.float16)})["image_features"]
                 for tile in pixel_values]
        return np.concatenate(tiles, axis=0).astype(np.float32)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        out = self._predict("embed_tokens", {"input_ids": input_ids.astype(np.int32)})
        return out["inputs_embeds"].astype(np.float32)

    def new_cache(self, max_length: int) -> CoreMLCache:
        if max_length > self.capacity:
            raise PromptTooLongError(
                f"prompt + max_new_tokens = {max_length} tokens exceeds this Core ML export's KV capacity "
                f"of {self.capacity}", hint="shorten the request or re-export with a larger Core ML context")
        return CoreMLCache(self.models["decoder"].make_state(), 0, max_length)

    def step(self, inputs_embeds: np.ndarray, cache: CoreMLCache) -> np.ndarray:
        query = inputs_embeds.shape[1]
        total = cache.length + query
        if total > self.capacity:
            raise PromptTooLongError(f"the sequence reached {total} tokens, over the Core ML KV capacity "
                                     f"of {self.capacity}", hint="lower max_new_tokens")
        feed = {
            "inputs_embeds": inputs_embeds.astype(np.float16),
            "position_ids": np.arange(cache.length, total, dtype=np.int32)[None, :],
            "causal_mask": causal_mask(cache.length, query, self.masked),
        }
        logits = self._predict("decoder", feed, cache.state)["logits"]
        cache.length = total
        return logits[0, -1].astype(np.float32)


def causal_mask(past: int, query: int, masked: float) -> np.ndarray:
    """``[1,1,S,P+S]`` fp16: 0 where query ``i`` (position ``past + i``) may see a key, ``masked`` elsewhere."""
    q_pos = np.arange(query)[:, None] + past
    k_pos = np.arange(past + query)[None, :]
    return np.where(k_pos > q_pos, masked, 0.0).astype(np.float16)[None, None]


def check_platform() -> None:
    """Core ML predictions with model state need macOS 15+; refuse anywhere else, in one line."""
    if sys.platform != "darwin":
        raise BackendUnavailableError(
            f"the coreml backend needs macOS 15+ (Core ML), and this is {platform.system() or sys.platform}",
            hint="run this bundle on a Mac or an iPhone, or use --backend onnx here")
    release = platform.mac_ver()[0]
    version = tuple(int(p) for p in release.split(".")[:2] if p.isdigit()) if release else (0,)
    if version < MIN_MACOS:
        raise BackendUnavailableError(f"the coreml backend needs macOS 15+ (stateful Core ML models); "
                                      f"this Mac runs macOS {release or 'unknown'}",
                                      hint="update macOS, or use --backend onnx")


def load(bundle: Bundle, **options) -> CoreMLBackend:
    check_platform()
    opts = backend_options(CoreMLOptions, FORMAT, options)
    if opts.compute_units not in COMPUTE_UNITS:
        raise ConfigError(f"unknown Core ML compute units {opts.compute_units!r}",
                          hint=f"use one of {', '.join(COMPUTE_UNITS)}")
    try:
        import coremltools as ct
    except ImportError:
        raise BackendUnavailableError("the coreml backend needs coremltools, which is not installed",
                                      hint=install_hint("coreml")) from None
    units = getattr(ct.ComputeUnit, opts.compute_units)
    models = {}
    for name, path in package_paths(bundle).items():
        try:
            models[name] = ct.models.MLModel(str(path), compute_units=units)
        except Exception as err:  # Core ML's compiler raises untyped errors on bad packages
            raise BundleError(f"Core ML cannot load {path.name}: {str(err).splitlines()[0][:200]}",
                              hint="the package is corrupt or needs a newer OS; re-export the bundle") from None
    return CoreMLBackend(bundle, models)
