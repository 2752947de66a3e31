"""What a size measures and the inputs every subject gets: the HF model, our default bundle, the images,
the requests (as ids and as chat text) and the token ids for contexts and fidelity.  Everything built is
cached under ``<smoledge cache>/bench/<size>-<model stamp>/``, so a rebuilt model gets fresh artifacts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from smoledge.benchmarks.config import Workload
from smoledge.benchmarks.peers import Case
from smoledge.runtime.cache import cache_path

FIDELITY_MAX_TOKENS = 512  # per text chunk, as quantize/fidelity.py


def model_dir_for(size: str) -> Path:
    if size == "full":
        from smoledge.benchmarks.full_model import build_full_model

        return build_full_model()
    from smoledge.export.realtext_model import ensure_realtext_model

    return ensure_realtext_model()


def model_stamp(model_dir: Path) -> str:
    """Identity of a model folder: its config and the names and sizes of its weight files."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    for marker in (".smoledge-built", ".smoledge-realtext.json"):
        if (model_dir / marker).is_file():
            digest.update((model_dir / marker).read_bytes())
    return digest.hexdigest()[:12]


def work_dir_for(size: str, model_dir: Path) -> Path:
    return cache_path("bench") / f"{size}-{model_stamp(model_dir)}"


def ensure_bundle(model_dir: Path, work_dir: Path, recipe: str | None = None,
                  formats: tuple[str, ...] = ("onnx",)) -> Path:
    """Our bundle of this model (the default recipe unless ``recipe``) with ``formats`` in it, exported with
    ``export_bundle`` (formats a cached bundle lacks are added to it; each takes the recipe's fallback for it)."""
    from smoledge.quantize.recipe import DEFAULT_RECIPE
    from smoledge.runtime.manifest import SCHEMA_VERSION

    recipe = recipe or DEFAULT_RECIPE

    out = work_dir / f"smoledge-{recipe}-schema{SCHEMA_VERSION}"  # a cached bundle of an older schema is left alone
    from smoledge.runtime.bundle import MANIFEST, open_bundle

    have = set(open_bundle(out, verify=False).formats) if (out / MANIFEST).is_file() else set()
    wanted = tuple(f for f in formats if f not in have)
    if not wanted:
        return out
    from smoledge.export.pipeline import ExportJob, export_bundle
    from smoledge.quantize.recipe import load_recipe

    return export_bundle(ExportJob(model=str(model_dir), out=out, recipe=load_recipe(recipe), formats=wanted),
                         show_progress=True)


def write_images(work_dir: Path, workload: Workload) -> tuple[Path, Path]:
    """A one-tile picture and a panorama (smooth gradients + noise, fixed seed), as PNG."""
    from PIL import Image

    paths = []
    for name, (width, height) in (("image", workload.image_size), ("split", workload.split_image_size)):
        path = work_dir / "inputs" / f"{name}-{width}x{height}.png"
        if not path.is_file():
            rng = np.random.default_rng(0)
            y, x = np.mgrid[0:height, 0:width]
            base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype("uint8")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths[0], paths[1]


class PromptMaker:
    """Requests rendered with the bundle's own chat template and tokenizer (the runtime's prompt code)."""

    def __init__(self, bundle: Path):
        from tokenizers import Tokenizer

        from smoledge.runtime.bundle import open_bundle

        self.bundle = open_bundle(bundle, verify=False)
        self.manifest = self.bundle.manifest
        self.tokenizer = Tokenizer.from_file(str(self.bundle.file(self.manifest.tokenizer.file)))

    def _tokens(self):
        from smoledge.runtime.prompt import ImageTokens

        t = self.manifest.tokens
        return ImageTokens(t.image, t.fake_image, t.global_image)

    def text_ids(self, prompt: str) -> list[int]:
        from smoledge.runtime.prompt import add_special_tokens_for, build_prompt
        from smoledge.runtime.types import Message

        m, bos = self.manifest, self.manifest.tokens.bos_token
        text = build_prompt((Message.user(prompt),), [], m.chat_template, self._tokens(),
                            m.image.image_seq_len, bos_token=bos, eos_token=m.tokens.eos_token)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens_for(text, bos)).ids

    def chat_text(self, prompt: str, image: Path | None) -> str:
        from smoledge.runtime.prompt import render_chat
        from smoledge.runtime.types import Message

        m = self.manifest
        return render_chat((Message.user(prompt, [image] if image else []),), m.chat_template,
                           add_generation_prompt=True, bos_token=m.tokens.bos_token, eos_token=m.tokens.eos_token)

    def cases(self, workload: Workload, image: Path, split_image: Path) -> dict[str, Case]:
        ids = tuple(self.text_ids(workload.prompt))
        return {
            "text": Case("text", workload.prompt, ids, self.chat_text(workload.prompt, None)),
            "image": Case("image", workload.prompt, ids, self.chat_text(workload.prompt, image), str(image), False),
            "split": Case("split", workload.prompt, ids, self.chat_text(workload.prompt, split_image),
                          str(split_image), True),
        }

    def fidelity_ids(self) -> list[list[int]]:
        """The fidelity text's chunks, tokenised as ``smoledge fidelity`` does."""
        from smoledge.fidelity import TEXT_FILE

        chunks = [line for line in TEXT_FILE.read_text().splitlines() if line.strip()]
        return [self.tokenizer.encode(chunk).ids[:FIDELITY_MAX_TOKENS] for chunk in chunks]

    def context_ids(self, length: int) -> list[int]:
        """``length`` prompt tokens: the fidelity text, repeated as needed."""
        ids = [i for chunk in self.fidelity_ids() for i in chunk]
        return (ids * (length // len(ids) + 1))[:length]
