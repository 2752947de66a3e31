"""transformers eager fp32 on the same SmolVLM checkpoint: the accuracy reference and the slow baseline.

The model is loaded as every export traces it (float32, eager attention); the processor is the
checkpoint's own (``export.loader.load_processor``).  Decoding keeps a ``DynamicCache`` and computes only
the last position's logits (``logits_to_keep=1``), as ``generate`` does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from smoledge.benchmarks.peers import Case, Engine, FirstToken, PrepareContext, Subject, folder_bytes, missing_packages

NAME = "transformers"


def missing() -> str | None:
    return missing_packages("torch", "transformers")


def reference_subject(ctx: PrepareContext) -> Subject:
    size = sum(p.stat().st_size for p in ctx.model_dir.glob("*.safetensors")) or folder_bytes(ctx.model_dir)
    return Subject(name="transformers eager fp32", peer=NAME, artifact=str(ctx.model_dir), size_bytes=size,
                   bits_per_weight=32.0, notes=("float32, eager attention; the fidelity reference",))


def prepare(ctx: PrepareContext) -> list[Subject]:
    return [reference_subject(ctx)]


class TransformersEngine(Engine):
    supports_images = True
    supports_split = True

    def __init__(self, subject: Subject, threads: int):
        import torch

        from smoledge.export.loader import load_model, load_processor, resolve

        torch.set_num_threads(threads)
        checkpoint = resolve(subject.artifact)
        self.torch = torch
        self.model = load_model(checkpoint)
        self.processor = load_processor(checkpoint)
        self.tile = int(self.model.config.vision_config.image_size)

    def first_token(self, case: Case) -> FirstToken:
        from PIL import Image

        torch = self.torch
        start = time.perf_counter()
        content = ([{"type": "image"}] if case.image else []) + [{"type": "text", "text": case.prompt}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        images = [[Image.open(case.image).convert("RGB")]] if case.image else None
        inputs = self.processor(text=text, images=images, return_tensors="pt",
                                **({"do_image_splitting": case.split} if images else {}))
        preprocess = time.perf_counter() - start
        with torch.inference_mode():
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
            int(out.logits[0, -1].argmax())
        tiles = int(inputs["pixel_values"].shape[1]) if images else 0
        return FirstToken(time.perf_counter() - start, preprocess, None, tiles, int(inputs["input_ids"].shape[1]))

    def vision_seconds_per_tile(self, image: str, repeats: int) -> float:
        torch = self.torch
        generator = torch.Generator().manual_seed(0)
        pixels = torch.rand((1, 1, 3, self.tile, self.tile), generator=generator) * 2 - 1
        mask = torch.ones((1, 1, self.tile, self.tile), dtype=torch.bool)
        times = []
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                self.model.model.get_image_features(pixel_values=pixels, pixel_attention_mask=mask)
                times.append(time.perf_counter() - start)
        return float(np.median(times))

    def generate(self, ids: list[int], new_tokens: int) -> Iterator[int]:
        from transformers import DynamicCache

        torch = self.torch
        cache = DynamicCache(config=self.model.config.text_config)
        step = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            for _ in range(new_tokens):
                out = self.model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
                token = int(out.logits[0, -1].argmax())
                yield token
                step = torch.tensor([[token]], dtype=torch.long)

    def logits(self, ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()


def open_engine(subject: Subject, threads: int, fidelity: bool = False) -> TransformersEngine:
    return TransformersEngine(subject, threads)
