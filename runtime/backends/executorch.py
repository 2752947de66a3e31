"""ExecuTorch backend: the bundle's ``.pte`` through ExecuTorch's Python runtime (``executorch.runtime``).

The program holds three methods (``vision_encoder``, ``token_embedding``, ``text_decoder``) and its own
static KV cache; the shared generation layers drive it like any backend.  Besides the portable and XNNPACK
kernels built into the runtime, the program calls ``quantized_decomposed::embedding_4bit`` and
ExecuTorch's ``llama::update_cache`` / ``llama::custom_sdpa``; those kernel libraries register themselves
when their Python modules are imported, which :func:`load_kernel_libraries` does.

ExecuTorch's Python runtime needs torch (its pybindings link libtorch), so unlike the ONNX backend this
one imports torch.  The KV cache lives inside the loaded program, so a backend serves one sequence at a
time: a new cache invalidates the previous one.

Memory (docs/executorch.md has the measured breakdown): the ``.pte`` is memory-mapped, not read
(ExecuTorch's ``MmapDataLoader``); XNNPACK packs each delegated method's weights into its own buffers when
the method loads and then unmaps the file pages, so the packed copy is the only one held.  The program's
memory-planned arena (KV cache + activations) is allocated once per program.  With
``ExecutorchOptions(vision="on-demand")`` the vision method is loaded for each batch of tiles and
released after it, so decoding never holds its packed weights (XNNPACK's workspace, shared by every
delegate and sized to the largest, stays).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from smoledge.errors import (BackendError, BackendUnavailableError, BundleError, ConfigError, InputError,
                             PromptTooLongError, install_hint)
from smoledge.runtime.backends.base import backend_options
from smoledge.runtime.bundle import Bundle

FORMAT = "executorch"
METHODS = ("vision_encoder", "token_embedding", "text_decoder")
VISION_MODES = ("resident", "on-demand")
KERNEL_LIBRARIES = ("executorch.kernels.quantized", "executorch.extension.llm.custom_ops.custom_ops")
# Python loggers that warn on every import of executorch.runtime (which imports the exporter and torchao).
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")
log = logging.getLogger(__name__)
# executorch/runtime/core/error.h
_ERRORS = {0x01: "internal error", 0x12: "invalid argument", 0x13: "invalid type", 0x14: "operator missing",
           0x20: "not found", 0x21: "memory allocation failed", 0x22: "access failed", 0x23: "invalid program",
           0x24: "invalid external data", 0x25: "out of resources", 0x30: "delegate incompatible",
           0x31: "delegate memory allocation failed"}


@dataclass(frozen=True)
class ExecutorchOptions:
    threads: int = 0  # ExecuTorch threadpool size (XNNPACK and custom kernels); 0 = the runtime's default
    # "resident": the vision method is loaded with the others (first: its load-time peak is then lowest) and
    # kept; "on-demand": loaded for each encode_images call and released after it (text-only requests never
    # load it; each image request pays its load, ~0.3-0.7 s on the real-text model).
    vision: str = "resident"

    def __post_init__(self):
        if self.vision not in VISION_MODES:
            raise ConfigError(f"unknown ExecuTorch vision mode {self.vision!r}",
                              hint=f"use one of {', '.join(VISION_MODES)}")


@dataclass
class ExecutorchCache:
    """Where the next tokens go in the program's KV cache; valid until the backend makes a new one."""

    generation: int
    max_length: int
    length: int = 0


def error_code(err: Exception) -> int | None:
    """The ExecuTorch error code in a pybindings message ("... error: 0x:14", "... error 0x12")."""
    match = re.search(r"0x:?([0-9a-fA-F]+)", str(err))
    return int(match.group(1), 16) if match else None


def describe_error(err: Exception) -> str:
    code = error_code(err)
    what = _ERRORS.get(code, "error") if code is not None else str(err).splitlines()[0][:200]
    return f"{what} (0x{code:02x})" if code is not None else what


@contextmanager
def quiet_loading():
    """Keep ExecuTorch's load-time chatter off the terminal: import-time warnings from torchao / torch's
    pytree, and the runtime's native log lines (cpuinfo probing, missing-kernel details), which go to
    file descriptor 2.  The native log is kept in ``.text`` (and logged at debug level) so errors can
    quote it."""
    captured = _Captured()
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            tmp.seek(0)
            captured.text = tmp.read().decode(errors="replace")
            if captured.text.strip():
                log.debug("executorch runtime log:\n%s", captured.text)


class _Captured:
    text = ""

    def missing_operators(self) -> list[str]:
        return sorted(set(re.findall(r"Missing operator: \[\d+\] (\S+)", self.text)))


def load_kernel_libraries() -> None:
    """Import the modules that register the quantized and LLM custom-op kernels with the runtime."""
    for name in KERNEL_LIBRARIES:
        try:
            importlib.import_module(name)
        except (ImportError, AssertionError, OSError) as err:
            raise BackendUnavailableError(f"ExecuTorch kernel library {name} cannot be loaded ({err})",
                                          hint=install_hint("executorch")) from None


def _pybindings():
    """ExecuTorch's pybindings module (what ``executorch.runtime.Runtime`` wraps).  The backend calls its
    program directly: ``executorch.runtime.Program`` caches every method it loads for the program's life,
    and the on-demand vision method must be released after use."""
    try:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Verification
    except ImportError as err:
        raise BackendUnavailableError(f"the executorch backend needs {err.name}, which is not installed",
                                      hint=install_hint("executorch")) from None
    return portable_lib, Verification


def method_names(program) -> list[str]:
    return [program.get_method_name(i) for i in range(program.num_methods())]


def open_program(path, methods: tuple[str, ...] = METHODS, threads: int = 0):
    """Memory-map the .pte (``MmapDataLoader``), load the kernel libraries and ``methods``, quietly;
    returns (program, {name: method}).  Errors are one line and quote the runtime's own reason (e.g. the
    missing operators)."""
    with quiet_loading():
        portable, verification = _pybindings()
        try:
            program = portable._load_program(str(path), program_verification=verification.InternalConsistency)
        except RuntimeError as err:
            raise BundleError(f"ExecuTorch cannot load {path.name}: {describe_error(err)}",
                              hint="the .pte is corrupt or from an incompatible exporter; re-export it") from None
        if not portable._is_available("XnnpackBackend"):
            raise BackendUnavailableError("this ExecuTorch runtime has no XNNPACK backend, which the .pte is "
                                          "delegated to", hint=install_hint("executorch"))
        load_kernel_libraries()
        if threads:  # before any method holds the pool
            portable._unsafe_reset_threadpool(threads)
    names = method_names(program)
    missing = [name for name in methods if name not in names]
    if missing:
        raise BundleError(f"{path.name} has no method {', '.join(missing)} (it has {', '.join(sorted(names))})",
                          hint="re-export with --format executorch")
    return program, {name: load_method(program, name) for name in methods}


def load_method(program, name: str):
    """A new instance of method ``name``: XNNPACK packs its weights now; dropping it frees them.  Methods
    share the program's memory-planned arena."""
    with quiet_loading() as native:
        try:
            return program.load_method(name)
        except RuntimeError as err:
            failure = err
    raise method_error(name, failure, native.missing_operators())


def method_error(name: str, err: Exception, missing_ops: list[str]) -> Exception:
    if error_code(err) == 0x14:
        ops = f": {', '.join(missing_ops)}" if missing_ops else ""
        return BackendUnavailableError(
            f"this ExecuTorch runtime lacks kernels the {name} method needs{ops}",
            hint="import executorch.kernels.quantized and executorch.extension.llm.custom_ops (the executorch "
                 "backend does) or upgrade executorch")
    return BundleError(f"ExecuTorch cannot load method {name}: {describe_error(err)}",
                       hint="the .pte is corrupt or needs a newer executorch; re-export the bundle")


class ExecutorchBackend:
    name = FORMAT

    def __init__(self, bundle: Bundle, options: ExecutorchOptions = ExecutorchOptions()):
        section = bundle.artifact(FORMAT)
        graphs = section.graphs
        self.method_of = {name: graph.method or name for name, graph in graphs.items()}
        self.vision_mode = options.vision
        resident = [name for name in graphs if name != "vision_encoder" or options.vision == "resident"]
        # the vision method first: its packing peak (the mapped weights + the packed copy) then comes
        # before the decoder's packed weights are held
        resident.sort(key=lambda name: name != "vision_encoder")
        self.program, loaded = open_program(bundle.file(graphs["decoder"].file),
                                            tuple(self.method_of[name] for name in resident), threads=options.threads)
        self.methods = dict(loaded)
        import torch  # present: executorch's pybindings need it and imported it above

        self.torch = torch
        self.max_context_len = section.capacity(bundle.manifest.context_length)
        self.tile_size = int(graphs["vision_encoder"].inputs["pixel_values"].shape[-1])
        self._generation = 0

    @property
    def vision_loaded(self) -> bool:
        return self.method_of["vision_encoder"] in self.methods

    def _run(self, method: str, inputs: list):
        try:
            return self.methods[method](inputs)[0]
        except RuntimeError as err:
            raise BackendError(f"ExecuTorch failed in {method}: {describe_error(err)}",
                               hint="rerun with --debug; the runtime's log above names the failing kernel") from err

    def encode_images(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray) -> np.ndarray:
        """One tile per call: the ``vision_encoder`` method takes [1,3,H,W], as ExecuTorch's runners send."""
        if not np.asarray(pixel_attention_mask).all():
            raise InputError("the ExecuTorch vision encoder takes whole tiles only (pixel mask all true)",
                             hint="use smoledge's preprocessing, which always sends whole tiles")
        if pixel_values.shape[1:] != (3, self.tile_size, self.tile_size):
            raise InputError(f"image tiles must be 3x{self.tile_size}x{self.tile_size}, got "
                             f"{'x'.join(map(str, pixel_values.shape[1:]))}")
        tiles = np.ascontiguousarray(pixel_values, dtype=np.float32)
        method = self.method_of["vision_encoder"]
        if method not in self.methods:
            self.methods[method] = load_method(self.program, method)
        try:
            parts = [self._run(method, [self.torch.from_numpy(tiles[i:i + 1])]).numpy() for i in range(len(tiles))]
        finally:
            if self.vision_mode == "on-demand":
                del self.methods[method]  # its packed weights go with it
        return np.concatenate(parts, axis=0)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        ids = self.torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64))
        return self._run(self.method_of["embed_tokens"], [ids]).numpy()

    def new_cache(self, max_length: int) -> ExecutorchCache:
        if max_length > self.max_context_len:
            raise PromptTooLongError(
                f"prompt + max_new_tokens ({max_length}) exceeds the ExecuTorch program's KV cache of "
                f"{self.max_context_len} positions", hint="shorten the request or re-export with a larger "
                "max_context_len")
        self._generation += 1
        return ExecutorchCache(self._generation, max_length)

    def step(self, inputs_embeds: np.ndarray, cache: ExecutorchCache) -> np.ndarray:
        if cache.generation != self._generation:
            raise BackendError("this KV cache was replaced by a newer one (the ExecuTorch program holds one "
                               "sequence at a time)", hint="finish one generation before starting the next")
        seq = inputs_embeds.shape[1]
        if cache.length + seq > self.max_context_len:
            raise PromptTooLongError(f"the sequence would grow past the KV cache of {self.max_context_len} "
                                     "positions", hint="lower max_new_tokens")
        torch = self.torch
        embeds = torch.from_numpy(np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        positions = torch.arange(cache.length, cache.length + seq, dtype=torch.long)
        logits = self._run(self.method_of["decoder"], [embeds, positions])
        cache.length += seq
        return logits.numpy().reshape(-1)


def load(bundle: Bundle, **options) -> ExecutorchBackend:
    return ExecutorchBackend(bundle, backend_options(ExecutorchOptions, FORMAT, options))
