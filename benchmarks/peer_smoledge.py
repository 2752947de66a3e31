"""Our bundles: one subject per (bundle, format), run through the runtime's own Pipeline and backend.

A format is measured when the runtime has a backend for it (``runtime.backends.BACKENDS``), so the
ExecuTorch and Core ML backends join the benchmark by being registered there.  TTFT goes through
``Pipeline.stream`` (template, tokenizer, image preprocessing, vision, prefill, first token: what
``smoledge run`` does); throughput goes through ``generate_step``, the runtime's layer 1.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from smoledge.benchmarks.peers import Case, Engine, FirstToken, PrepareContext, Subject
from smoledge.runtime.manifest import Artifact, Manifest

NAME = "smoledge"


def missing() -> str | None:
    return None


def prepare(ctx: PrepareContext) -> list[Subject]:
    from smoledge.runtime.bundle import open_bundle
    from smoledge.runtime.formats import FORMATS

    subjects = []
    for bundle in ctx.bundles:
        manifest = open_bundle(bundle, verify=False).manifest
        for fmt, artifact in manifest.artifacts.items():
            if fmt not in FORMATS:
                continue
            name = f"smoledge {fmt} {artifact.recipe_name or ''} ({Path(bundle).name})".strip()
            subject = Subject(name=name, peer=NAME, artifact=str(bundle), options={"format": fmt},
                              size_bytes=artifact_bytes(manifest, fmt), bits_per_weight=bits_per_weight(artifact),
                              notes=(f"recipe {artifact.recipe_name}",))
            subjects.append(subject)
            options = ctx.profile.options_for(fmt) if ctx.profile else {}
            if options:  # the same artifact as the device profile loads it
                said = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
                subjects.append(replace(subject, name=f"{name} [{ctx.profile.name}: {said}]",
                                        options={"format": fmt, "backend": options},
                                        notes=(*subject.notes, f"backend options of profile {ctx.profile.name}: "
                                                               f"{said}")))
    return subjects


def artifact_bytes(manifest: Manifest, fmt: str) -> int:
    """Bytes on disk of one format's files plus the tokenizer (what a device must hold to run it)."""
    needed = {rel for graph in manifest.artifacts[fmt].graphs.values() for rel in graph.files}
    needed.add(manifest.tokenizer.file)
    return sum(entry.size for rel, entry in manifest.files.items() if rel in needed)


def bits_per_weight(artifact: Artifact) -> float | None:
    """Weighted bits per weight over the text graphs (embedding + decoder, lm_head included)."""
    bits = weights = 0.0
    for name, graph in artifact.graphs.items():
        count = graph.weight_count
        if name == "vision_encoder" or not count or graph.bits_per_weight is None:
            continue
        bits += graph.bits_per_weight * count
        weights += count
    return round(bits / weights, 3) if weights else None


class SmolEdgeEngine(Engine):
    supports_images = True
    supports_split = True

    def __init__(self, subject: Subject, threads: int):
        from smoledge.runtime.pipeline import Pipeline

        from smoledge.runtime.formats import backend_options

        fmt = subject.options["format"]
        options = {**backend_options(fmt, threads=threads), **subject.options.get("backend", {})}
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
        from smoledge.runtime.backends import all_logits

        return all_logits(self.backend, self.backend.embed(np.asarray([ids], dtype=np.int64)))


def open_engine(subject: Subject, threads: int, fidelity: bool = False) -> SmolEdgeEngine:
    return SmolEdgeEngine(subject, threads)
