"""The peer registry and the two types every peer speaks: :class:`Subject` and :class:`Engine`.

A peer is one module registered in :data:`PEERS`, exposing

* ``NAME`` and ``missing() -> str | None``: why it cannot run here (a package not installed), or None;
* ``prepare(ctx: PrepareContext) -> list[Subject]``: in the parent process, build or convert what it
  measures (cached under ``ctx.work_dir``) and describe it;
* ``open_engine(subject, threads, fidelity=False) -> Engine``: in the worker subprocess, load it.

``smoledge`` (our bundles, one subject per bundle format, through the runtime's backend registry) is a
peer like the others, and always measured.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from smoledge.cloud_fallback.profiles import DeviceProfile

PEERS = {
    "smoledge": "smoledge.benchmarks.peer_smoledge",
    "transformers": "smoledge.benchmarks.peer_transformers",
    "llamacpp": "smoledge.benchmarks.peer_llamacpp",
    "genai": "smoledge.benchmarks.peer_genai",
}


class PeerSkipped(Exception):
    """A peer cannot be measured here; the message says why (reported, never fatal)."""


@dataclass(frozen=True)
class Subject:
    """One column of the report: an artifact and the peer that runs it."""

    name: str
    peer: str
    artifact: str
    options: dict = field(default_factory=dict)
    size_bytes: int = 0
    bits_per_weight: float | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Subject":
        return cls(**{**d, "notes": tuple(d.get("notes", ()))})


@dataclass(frozen=True)
class PrepareContext:
    size: str
    model_dir: Path  # the HF SmolVLM folder every subject is made from
    work_dir: Path  # where this size's converted artifacts are cached
    bundles: tuple[Path, ...]  # our bundles to measure (already exported)
    threads: int
    max_tokens: int = 4096  # the longest sequence a pass runs (context + decode, or an image prompt)
    profile: DeviceProfile | None = None  # --profile's: our subjects also run with its backend_options


@dataclass(frozen=True)
class Case:
    """One first-token request: ``kind`` is text, image (one tile) or split (tiles + global image)."""

    kind: str
    prompt: str
    prompt_ids: tuple[int, ...]  # the chat-templated text prompt, for peers that take ids
    chat_text: str = ""  # the rendered chat with "<image>" unexpanded, for peers that expand it themselves
    image: str | None = None
    split: bool = False


@dataclass
class FirstToken:
    ttft_s: float
    preprocess_s: float | None = None
    vision_s: float | None = None
    tiles: int = 0
    prompt_tokens: int = 0


class Engine:
    """A loaded subject.  Peers override what they support; ``None`` means not measurable."""

    supports_images = False
    supports_split = False

    def first_token(self, case: Case) -> FirstToken | None:
        """Answer ``case`` up to its first token (fresh cache), timing it."""
        return None

    def vision_seconds_per_tile(self, image: str, repeats: int) -> float | None:
        """Median seconds to encode one tile (``image`` is a one-tile picture, for peers that need a file)."""
        return None

    def generate(self, ids: list[int], new_tokens: int) -> Iterator[int]:
        """Prefill ``ids`` (fresh cache) and yield greedy tokens, EOS ignored; the first yield ends the prefill."""
        raise NotImplementedError

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits at every position, [len(ids), vocab] float32."""
        raise NotImplementedError


def peer_module(name: str):
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; available: {', '.join(PEERS)}")
    return importlib.import_module(PEERS[name])


def missing_packages(*names: str) -> str | None:
    """``'X is not installed'`` for the first import name that cannot be found, else None."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (from the smoledge clone: pip install -e '.[bench]')"
    return None


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
