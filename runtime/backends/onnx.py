"""ONNX Runtime backend: the bundle's three ONNX graphs.

Execution providers are passed through by short name (cpu, cuda, tensorrt, coreml, nnapi, xnnpack) or
onnxruntime's full name; CPU by default, the others where the installed onnxruntime has them.  The KV cache is a list of numpy arrays fed as ``past_key_values.*``
and replaced by ``present.*`` each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from smoledge.errors import BackendError, BackendUnavailableError, BundleError
from smoledge.runtime.bundle import Bundle
from smoledge.runtime.manifest import Graph

FORMAT = "onnx"
# --providers may name an execution provider by its short name; anything else passes through unchanged.
PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider",
                  "nnapi": "NnapiExecutionProvider", "xnnpack": "XnnpackExecutionProvider"}


def provider_names(names) -> tuple[str, ...]:
    """onnxruntime's names for ``names`` ("cuda" -> "CUDAExecutionProvider"; full names kept as given)."""
    return tuple(PROVIDER_NAMES.get(n.strip().lower(), n.strip()) for n in names if n.strip())


@dataclass
class OnnxCache:
    past: list[np.ndarray]
    length: int = 0
    max_length: int = 0


@dataclass(frozen=True)
class OnnxOptions:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0  # 0 = onnxruntime's default (all physical cores)
    vision_batch: int = 4  # tiles per vision-encoder call (bounds peak memory)


class OnnxBackend:
    name = FORMAT

    def __init__(self, bundle: Bundle, options: OnnxOptions = OnnxOptions()):
        import onnxruntime as ort

        options = replace(options, providers=provider_names(options.providers))
        self.options = options
        section = bundle.artifact(FORMAT)
        available = ort.get_available_providers()
        missing = [p for p in options.providers if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"execution provider(s) {', '.join(missing)} not in this onnxruntime build",
                hint=f"available here: {', '.join(available)}")
        sess_opts = ort.SessionOptions()
        if options.threads:
            sess_opts.intra_op_num_threads = options.threads
        sess_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {name: self._session(ort, bundle, graph, sess_opts) for name, graph in section.graphs.items()}
        decoder = section.graphs["decoder"]
        self.past_names = [n for n in decoder.inputs if n.startswith("past_key_values.")]
        self.present_names = [n for n in decoder.outputs if n.startswith("present.")]
        self.kv_shape = decoder.inputs[self.past_names[0]].shape  # [batch, heads, past, head_dim]

    def _session(self, ort, bundle: Bundle, graph: Graph, sess_opts):
        path = bundle.file(graph.file)
        for rel in graph.files:
            bundle.file(rel)  # listed and inside the bundle
        try:
            return ort.InferenceSession(str(path), sess_options=sess_opts, providers=list(self.options.providers))
        except Exception as err:  # onnxruntime raises its own untyped exceptions on bad files
            raise BundleError(f"onnxruntime cannot load {graph.file}: {str(err).splitlines()[0][:200]}",
                              hint="the file is corrupt or from a newer exporter; re-export the bundle") from None

    def _run(self, graph: str, feed: dict, outputs=None):
        try:
            return self.sessions[graph].run(outputs, feed)
        except MemoryError:
            raise
        except Exception as err:
            raise BackendError(f"onnxruntime failed in {graph}: {str(err).splitlines()[0][:200]}") from err

    def encode_images(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray) -> np.ndarray:
        step = max(1, self.options.vision_batch)
        parts = [self._run("vision_encoder", {"pixel_values": pixel_values[i:i + step],
                                              "pixel_attention_mask": pixel_attention_mask[i:i + step]})[0]
                 for i in range(0, len(pixel_values), step)]
        return np.concatenate(parts, axis=0)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("embed_tokens", {"input_ids": input_ids.astype(np.int64)})[0]

    def new_cache(self, max_length: int) -> OnnxCache:
        _, heads, _, head_dim = self.kv_shape
        empty = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
        return OnnxCache([empty] * len(self.past_names), 0, max_length)

    def _decode(self, inputs_embeds: np.ndarray, cache: OnnxCache) -> np.ndarray:
        """Run the decoder after ``cache``; advance it; the logits of every new position [S, vocab]."""
        seq = inputs_embeds.shape[1]
        total = cache.length + seq
        feed = {
            "inputs_embeds": inputs_embeds.astype(np.float32, copy=False),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(cache.length, total, dtype=np.int64)[None, :],
        }
        feed.update(zip(self.past_names, cache.past))
        logits, *present = self._run("decoder", feed)
        cache.past = present
        cache.length = total
        return logits[0]

    def step(self, inputs_embeds: np.ndarray, cache: OnnxCache) -> np.ndarray:
        return self._decode(inputs_embeds, cache)[-1]

    def all_logits(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Teacher-forced logits at every position [S, vocab], in one decoder call on a fresh cache."""
        return self._decode(inputs_embeds, self.new_cache(inputs_embeds.shape[1]))


def load(bundle: Bundle, **options) -> OnnxBackend:
    return OnnxBackend(bundle, OnnxOptions(**options))
