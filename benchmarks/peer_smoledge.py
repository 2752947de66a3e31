"""Our bundles: one subject per (bundle, format), run through the runtime's own Pipeline and backend.

A format is measured when the runtime has a backend for it (``runtime.backends.BACKENDS``), so the
ExecuTorch and Core ML backends join the benchmark by being registered there.  TTFT goes through
``Pipeline.stream`` (template, tokenizer, image preprocessing, vision, prefill, first token: what
``smoledge run`` does); throughput goes through ``generate_step``, the runtime's layer 1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from smoledge.benchmarks.peers import Case, Engine, FirstToken, PrepareContext, Subject

NAME = "smoledge"
# backend -> the option that sets its thread count (a backend without one runs its default)
THREAD_OPTIONS = {"onnx": "threads", "executorch": "threads"}


def missing() -> str | None:
    return None


def prepare(ctx: PrepareContext) -> list[Subject]:
    from smoledge.runtime.backends import BACKENDS

    subjects = []
    for bundle in ctx.bundles:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        for fmt, artifact in manifest["artifacts"].items():
            if fmt not in BACKENDS:
                continue
            subjects.append(Subject(
                name=f"smoledge {fmt} {artifact.get('recipe', {}).get('name', '')} ({Path(bundle).name})".strip(),
                peer=NAME, artifact=str(bundle), options={"format": fmt},
                size_bytes=artifact_bytes(manifest, fmt), bits_per_weight=bits_per_weight(artifact),
                notes=(f"recipe {artifact.get('recipe', {}).get('name')}",)))
    return subjects


def artifact_bytes(manifest: dict, fmt: str) -> int:
    """Bytes on disk of one format's files plus the tokenizer (what a device must hold to run it)."""
    files = manifest.get("files", {})
    prefix = f"{fmt}/"
    total = sum(f.get("size", 0) for name, f in files.items() if name.startswith(prefix))
    tokenizer = manifest.get("tokenizer", {}).get("file")
    return total + (files.get(tokenizer, {}).get("size", 0) if tokenizer else 0)


def bits_per_weight(artifact: dict) -> float | None:
    """Weighted bits per weight over the text graphs (embedding + decoder, lm_head included)."""
    bits = weights = 0.0
    for name, graph in artifact.get("graphs", {}).items():
        report = graph.get("quantization") or {}
        count = report.get("weights") or report.get("parameters")
        if name == "vision_encoder" or not count or report.get("bits_per_weight") is None:
            continue
        bits += report["bits_per_weight"] * count
        weights += count
    return round(bits / weights, 3) if weights else None


class SmolEdgeEngine(Engine):
    supports_images = True
    supports_split = True

    def __init__(self, subject: Subject, threads: int):
        from smoledge.runtime.pipeline import Pipeline

        fmt = subject.options["format"]
        options = {THREAD_OPTIONS[fmt]: threads} if fmt in THREAD_OPTIONS else {}
        self.pipe = Pipeline.load(subject.artifact, backend=fmt, **options)
        self.backend = self.pipe.backend
        self.image_config = self.pipe.image_config

    def first_token(self, case: Case) -> FirstToken:
        from smoledge.runtime.types import ChatRequest, Message, SamplingConfig

        self.pipe.image_config = replace(self.image_config, do_image_splitting=case.split)
        images = [case.image] if case.image else []
        request = ChatRequest((Message.user(case.prompt, images),), SamplingConfig(max_new_tokens=1))
        for _ in self.pipe.stream(request):
            break
        stats = self.pipe.last_stats
        self.pipe.image_config = self.image_config
        return FirstToken(stats.time_to_first_token_s, stats.preprocess_s, stats.vision_s if images else None,
                          stats.image_tiles, stats.prompt_tokens)

    def vision_seconds_per_tile(self, image: str, repeats: int) -> float:
        side = self.image_config.tile_size
        pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, side, side)).astype(np.float32)
        mask = np.ones((1, side, side), dtype=bool)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.backend.encode_images(pixels, mask)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    def generate(self, ids: list[int], new_tokens: int) -> Iterator[int]:
        from smoledge.runtime.generate import Sampler, generate_step
        from smoledge.runtime.types import SamplingConfig

        input_ids = np.asarray([ids], dtype=np.int64)
        embeds = self.backend.embed(input_ids)
        cache = self.backend.new_cache(len(ids) + new_tokens)
        sampler = Sampler(SamplingConfig(max_new_tokens=new_tokens))
        for token, _ in generate_step(self.backend, embeds, cache, sampler, new_tokens):
            yield int(token)

    def logits(self, ids: list[int]) -> np.ndarray:
        input_ids = np.asarray([ids], dtype=np.int64)
        embeds = self.backend.embed(input_ids)
        if hasattr(self.backend, "sessions"):  # ONNX: the whole sequence in one decoder call
            return _onnx_all_logits(self.backend, embeds)
        cache = self.backend.new_cache(len(ids))  # any backend: one teacher-forced step per token
        return np.stack([self.backend.step(embeds[:, i:i + 1], cache) for i in range(len(ids))]).astype(np.float32)


def _onnx_all_logits(backend, embeds: np.ndarray) -> np.ndarray:
    length = embeds.shape[1]
    feed = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": np.ones((1, length), np.int64),
            "position_ids": np.arange(length, dtype=np.int64)[None]}
    feed.update(zip(backend.past_names, backend.new_cache(length).past))
    return backend.sessions["decoder_model_merged"].run(["logits"], feed)[0][0].astype(np.float32)


def open_engine(subject: Subject, threads: int, fidelity: bool = False) -> SmolEdgeEngine:
    return SmolEdgeEngine(subject, threads)
