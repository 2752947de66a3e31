"""ExecuTorch backend: the bundle's ``.pte`` through ExecuTorch's Python runtime (``executorch.runtime``).

The program holds three methods (``vision_encoder``, ``token_embedding``, ``text_decoder``) and its own
static KV cache; the shared generation layers drive it like any backend.  Besides the portable and XNNPACK
kernels built into the runtime, the program calls ``quantized_decomposed::embedding_4bit`` and
ExecuTorch's ``llama::update_cache`` / ``llama::custom_sdpa``; those kernel libraries register themselves
when their Python modules are imported, which :func:`load_kernel_libraries` does.

ExecuTorch's Python runtime needs torch (its pybindings link libtorch), so unlike the ONNX backend this
one imports torch.  The KV cache lives inside the loaded program, so a backend serves one sequence at a
time: a new cache invalidates the previous one.
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

from smoledge.errors import BackendError, BackendUnavailableError, BundleError, InputError, PromptTooLongError
from smoledge.runtime.bundle import Bundle

FORMAT = "executorch"
METHODS = ("vision_encoder", "token_embedding", "text_decoder")
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
                                          hint="install the executorch pip package (>= 1.5), which ships it") from None


def _runtime():
    try:
        from executorch.runtime import Runtime
    except ImportError as err:
        raise BackendUnavailableError(f"the executorch backend needs {err.name}, which is not installed",
                                      hint="pip install 'executorch>=1.5'") from None
    return Runtime.get()


def open_program(path, methods: tuple[str, ...] = METHODS, threads: int = 0):
    """Load the .pte, the kernel libraries and ``methods``, quietly; returns (program, {name: method}).
    Errors are one line and quote the runtime's own reason (e.g. the missing operators)."""
    failure = None
    with quiet_loading() as native:
        runtime = _runtime()
        try:
            program = runtime.load_program(path)
        except RuntimeError as err:
            raise BundleError(f"ExecuTorch cannot load {path.name}: {describe_error(err)}",
                              hint="the .pte is corrupt or from an incompatible exporter; re-export it") from None
        if not runtime.backend_registry.is_available("XnnpackBackend"):
            raise BackendUnavailableError("this ExecuTorch runtime has no XNNPACK backend, which the .pte is "
                                          "delegated to", hint="install the executorch pip package (>= 1.5)")
        load_kernel_libraries()
        if threads:  # before any method holds the pool
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)
        missing = [name for name in methods if name not in program.method_names]
        if missing:
            raise BundleError(f"{path.name} has no method {', '.join(missing)} (it has "
                              f"{', '.join(sorted(program.method_names))})", hint="re-export with --format executorch")
        loaded = {}
        for name in methods:
            try:
                loaded[name] = program.load_method(name)
            except RuntimeError as err:
                failure = (name, err)
                break
    if failure:
        raise method_error(*failure, native.missing_operators())
    return program, loaded


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
        self.program, self.methods = open_program(bundle.file(graphs["decoder"].file),
                                                  tuple(self.method_of.values()), threads=options.threads)
        import torch  # present: executorch.runtime needs it and imported it above

        self.torch = torch
        self.max_context_len = section.capacity(bundle.manifest.context_length)
        self.tile_size = int(graphs["vision_encoder"].inputs["pixel_values"].shape[-1])
        self._generation = 0

    def _run(self, method: str, inputs: list):
        try:
            return self.methods[method].execute(inputs)[0]
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
        parts = [self._run(self.method_of["vision_encoder"], [self.torch.from_numpy(tiles[i:i + 1])]).numpy()
                 for i in range(len(tiles))]
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
    return ExecutorchBackend(bundle, ExecutorchOptions(**options))
