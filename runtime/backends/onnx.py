"""ONNX Runtime backend: the bundle's three ONNX graphs.

Execution providers are passed through by short name (cpu, cuda, tensorrt, coreml, nnapi, xnnpack) or
onnxruntime's full name; CPU by default, the others where the installed onnxruntime has them.

The decoder runs through I/O binding: the KV cache is one preallocated OrtValue per layer and kind, bound as
both ``past_key_values.*`` and ``present.*`` (GroupQueryAttention writes into it in place), and a step's logits
(``logits_to_keep`` = 1, prefill included) land in one preallocated [1, 1, vocab] OrtValue.  The cache's dtype
is the manifest's (the decoder's ``past_key_values.*`` dtype: float16 or float32; a bundle that records none
has an fp32 cache).

Memory: every session has its own CPU arena.  The vision encoder's session runs without onnxruntime's memory
pattern (with it, the second call of a shape allocates the whole planned block again beside the first call's
free chunks: 4 tiles of the real-text bundle peaked 1.65 GB on the second call instead of 0.99 GB), and with
``shrink_arena`` its arena, and the decoder's after a prefill, go back to the system after the run, so the next
stage of the request does not stack on the last one's free buffers.  One-token decode steps keep their arena.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np

from smoledge.errors import BackendError, BackendUnavailableError, BundleError, ConfigError
from smoledge.runtime.backends import os_memory
from smoledge.runtime.backends.base import backend_options
from smoledge.runtime.bundle import Bundle
from smoledge.runtime.manifest import Graph

FORMAT = "onnx"
VISION_SESSION = ("lazy", "keep", "release", "exclusive")
# --providers may name an execution provider by its short name; anything else passes through unchanged.
PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider",
                  "nnapi": "NnapiExecutionProvider", "xnnpack": "XnnpackExecutionProvider"}


def provider_names(names) -> tuple[str, ...]:
    """onnxruntime's names for ``names`` ("cuda" -> "CUDAExecutionProvider"; full names kept as given)."""
    return tuple(PROVIDER_NAMES.get(n.strip().lower(), n.strip()) for n in names if n.strip())


KV_DTYPES = {None: np.float32, "float32": np.float32, "float16": np.float16}  # manifest dtype -> numpy


@dataclass
class OnnxCache:
    """One preallocated buffer per layer and kind, [1, kv_heads, capacity, head_dim], bound to the decoder as
    both ``past_key_values.*`` and ``present.*``: GroupQueryAttention writes each step's keys/values in place."""

    past: list  # onnxruntime.OrtValue
    length: int = 0
    max_length: int = 0
    logits: object = None  # OrtValue [1, 1, vocab], the bound output of every one-position step


@dataclass(frozen=True)
class OnnxOptions:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0  # 0 = onnxruntime's default (all physical cores)
    vision_batch: int = 4  # tiles per vision-encoder call (bounds peak memory)
    # when the vision encoder's session exists: "lazy" (created by the first image, then kept), "keep" (created
    # at load), "release" (created per image request and freed after it: least memory while decoding),
    # "exclusive" (as release, and the decoder's session is freed while it runs and created again for the prefill:
    # the two graphs' weights are never resident together; each image request reloads the decoder)
    vision_session: str = "lazy"
    # onnxruntime's CPU arena keeps the largest activations ever needed (a long prefill) for the process's life;
    # off, each run's activations are freed after it
    memory_arena: bool = True
    # with the arena on: hand its free regions back after every vision-encoder call and every prefill (not after
    # one-token decode steps), so the vision encode's buffers are not held through the prefill and decode
    shrink_arena: bool = True
    # onnxruntime repacks MatMulNBits weights into its kernels' layout at load; False keeps the bundle's layout
    # ("session.disable_prepacking")
    prepack: bool = True
    # page out a session's external-data files while it is created and after: the prepacked weights' scales and
    # zero points stay mapped beside their packed copies (runtime/backends/os_memory.py; Linux only)
    release_mapped_pages: bool = True


class OnnxBackend:
    name = FORMAT

    def __init__(self, bundle: Bundle, options: OnnxOptions = OnnxOptions()):
        import onnxruntime as ort

        options = replace(options, providers=provider_names(options.providers))
        self.options = options
        self._ort = ort
        section = bundle.artifact(FORMAT)
        available = ort.get_available_providers()
        missing = [p for p in options.providers if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"execution provider(s) {', '.join(missing)} not in this onnxruntime build",
                hint=f"available here: {', '.join(available)}")
        if options.vision_session not in VISION_SESSION:
            raise ConfigError(f"vision_session {options.vision_session!r} is not one of {', '.join(VISION_SESSION)}",
                              hint="lazy (default), keep, release or exclusive")
        self._bundle, self._graphs = bundle, section.graphs
        self._sess_opts = {name: _session_options(ort, options, vision=name == "vision_encoder")
                           for name in section.graphs}
        self._shrink = ort.RunOptions()
        if options.shrink_arena and options.memory_arena:  # onnxruntime refuses to shrink an arena that is off
            self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        eager = [n for n in section.graphs if n != "vision_encoder" or options.vision_session == "keep"]
        self.sessions = {name: self._session(ort, bundle, section.graphs[name], self._sess_opts[name])
                         for name in eager}
        decoder = section.graphs["decoder"]
        self.past_names = [n for n in decoder.inputs if n.startswith("past_key_values.")]
        self.present_names = [n for n in decoder.outputs if n.startswith("present.")]
        self.kv_shape = decoder.inputs[self.past_names[0]].shape  # [batch, heads, capacity, head_dim]
        self.kv_dtype = _kv_dtype(decoder.inputs[self.past_names[0]].dtype)
        self.vocab_size = int(decoder.outputs["logits"].shape[-1])
        self._device = "cpu"  # the cache and logits live in host memory, for every provider

    def _session(self, ort, bundle: Bundle, graph: Graph, sess_opts):
        path = bundle.file(graph.file)
        data = [bundle.file(rel) for rel in graph.files if rel != graph.file]  # listed and inside the bundle
        # the prepacked weights' scales and zero points stay mapped beside their packed copies: page them out
        # while the session is created and after (runtime/backends/os_memory.py)
        paging = self.options.release_mapped_pages and self.options.prepack and data
        try:
            with os_memory.paging_out(data) if paging else nullcontext():
                return ort.InferenceSession(str(path), sess_options=sess_opts,
                                            providers=list(self.options.providers))
        except Exception as err:  # onnxruntime raises its own untyped exceptions on bad files
            raise BundleError(f"onnxruntime cannot load {graph.file}: {str(err).splitlines()[0][:200]}",
                              hint="the file is corrupt or from a newer exporter; re-export the bundle") from None

    def _run(self, graph: str, feed: dict, outputs=None, run_options=None):
        try:
            return self.sessions[graph].run(outputs, feed, run_options)
        except MemoryError:
            raise
        except Exception as err:
            raise BackendError(f"onnxruntime failed in {graph}: {str(err).splitlines()[0][:200]}") from err

    def _ensure(self, name: str) -> None:
        """Create ``name``'s session if this backend does not hold it now (lazy vision, the exclusive mode)."""
        if name not in self.sessions:
            self.sessions[name] = self._session(self._ort, self._bundle, self._graphs[name], self._sess_opts[name])

    def encode_images(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray) -> np.ndarray:
        if self.options.vision_session == "exclusive" and self.sessions.pop("decoder", None) is not None:
            os_memory.trim_heap()  # its packed weights go back before the vision weights load
        self._ensure("vision_encoder")
        step = max(1, self.options.vision_batch)
        try:
            parts = [self._run("vision_encoder", {"pixel_values": pixel_values[i:i + step],
                                                  "pixel_attention_mask": pixel_attention_mask[i:i + step]},
                               run_options=self._shrink)[0]
                     for i in range(0, len(pixel_values), step)]
        finally:
            if self.options.vision_session in ("release", "exclusive"):
                self.sessions.pop("vision_encoder", None)
                os_memory.trim_heap()
        return np.concatenate(parts, axis=0)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("embed_tokens", {"input_ids": input_ids.astype(np.int64)})[0]

    def new_cache(self, max_length: int) -> OnnxCache:
        """Buffers for ``max_length`` positions, allocated once and zeroed: GQA reads a shared buffer past the
        valid length (masked, but a NaN bit pattern there would still reach the output). ``np.zeros`` pages
        cost no memory until written; the OrtValues wrap the arrays without a copy."""
        _, heads, _, head_dim = self.kv_shape
        wrap = self._ort.OrtValue.ortvalue_from_numpy
        past = [wrap(np.zeros((1, heads, max_length, head_dim), self.kv_dtype)) for _ in self.past_names]
        logits = self._ort.OrtValue.ortvalue_from_shape_and_type([1, 1, self.vocab_size], np.float32, self._device)
        return OnnxCache(past, 0, max_length, logits)

    def _decode(self, inputs_embeds: np.ndarray, cache: OnnxCache, keep: int):
        """Run the decoder on [1,S,hidden] after ``cache`` (written in place); the logits of the last ``keep``
        positions, as the bound OrtValue."""
        seq = inputs_embeds.shape[1]
        total = cache.length + seq
        if total > cache.max_length:
            raise BackendError(f"the KV cache holds {cache.max_length} positions; this step needs {total}")
        self._ensure("decoder")  # freed by an exclusive-mode image encode
        binding = self.sessions["decoder"].io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        binding.bind_cpu_input("logits_to_keep", np.array([keep], dtype=np.int64))
        for past, present, value in zip(self.past_names, self.present_names, cache.past):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # the same buffer: GQA appends in place
        if keep == 1:
            binding.bind_ortvalue_output("logits", cache.logits)
        else:
            binding.bind_output("logits", self._device)
        try:
            # a prefill's activations go back to the system after it; a one-token step keeps its arena
            self.sessions["decoder"].run_with_iobinding(binding, self._shrink if seq > 1 else None)
        except Exception as err:
            raise BackendError(f"onnxruntime failed in decoder: {str(err).splitlines()[0][:200]}") from err
        cache.length = total
        return cache.logits if keep == 1 else binding.get_outputs()[-1]

    def step(self, inputs_embeds: np.ndarray, cache: OnnxCache) -> np.ndarray:
        """The last position's logits [vocab] (a copy: the bound buffer is reused by the next step)."""
        return self._decode(inputs_embeds, cache, 1).numpy()[0, -1].copy()

    def all_logits(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Teacher-forced logits at every position [S, vocab], in one decoder call on a fresh cache."""
        seq = inputs_embeds.shape[1]
        return self._decode(inputs_embeds, self.new_cache(seq), seq).numpy()[0].copy()


def _session_options(ort, options: OnnxOptions, *, vision: bool):
    """One session's options.  The vision encoder's go without the memory pattern (see the module doc)."""
    sess_opts = ort.SessionOptions()
    if options.threads:
        sess_opts.intra_op_num_threads = options.threads
    sess_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess_opts.enable_cpu_mem_arena = options.memory_arena
    sess_opts.enable_mem_pattern = not vision
    if not options.prepack:
        sess_opts.add_session_config_entry("session.disable_prepacking", "1")
    return sess_opts


def _kv_dtype(recorded: str | None):
    if recorded not in KV_DTYPES:
        raise BundleError(f"the decoder's KV cache dtype {recorded!r} is not one this smoledge runs "
                          f"({', '.join(k for k in KV_DTYPES if k)})", hint="re-export the bundle with this smoledge")
    return KV_DTYPES[recorded]


def load(bundle: Bundle, **options) -> OnnxBackend:
    return OnnxBackend(bundle, backend_options(OnnxOptions, FORMAT, options))
