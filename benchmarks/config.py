"""What a benchmark run measures: the model size, the workload and the run settings (plain data)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

SIZES = ("realtext", "full")
DEFAULT_PEERS = ("transformers", "llamacpp", "genai")


@dataclass(frozen=True)
class Workload:
    """The requests every subject answers.

    * ``text``: the chat-templated short prompt, no image;
    * ``image``: one image as a single tile (splitting off), short prompt;
    * ``split``: a panorama with splitting on (a row of tiles + the global image), short prompt.

    Prefill and decode are timed at each of ``contexts`` (prompt tokens taken from the fidelity text,
    the same ids for every subject), decoding ``decode_tokens`` greedy tokens (EOS ignored).
    """

    prompt: str = "Describe this image in one sentence."
    image_size: tuple[int, int] = (384, 384)  # (width, height)
    split_image_size: tuple[int, int] = (1024, 256)
    contexts: tuple[int, ...] = (128, 512, 1024)
    headline_context: int = 512
    decode_tokens: int = 32
    vision_repeats: int = 3

    def __post_init__(self):
        if self.headline_context not in self.contexts:
            raise ValueError(f"headline context {self.headline_context} not in {self.contexts}")

    def to_dict(self) -> dict:
        return asdict(self)


WORKLOADS = {
    "realtext": Workload(image_size=(512, 512), split_image_size=(1024, 256)),
    "full": Workload(image_size=(384, 384), split_image_size=(1024, 256)),
}
QUICK = dict(contexts=(64, 256), headline_context=256, decode_tokens=8, vision_repeats=1)


def workload_for(size: str, quick: bool) -> Workload:
    base = WORKLOADS[size]
    return replace(base, **QUICK) if quick else base


def default_formats() -> tuple[str, ...]:
    """The registered formats with runtime parity whose backend runs on this machine (the format registry):
    ONNX always, the ExecuTorch .pte beside it where executorch is installed (the [executorch] extra)."""
    from smoledge.runtime.formats import FORMATS

    return tuple(name for name, spec in FORMATS.items() if spec.parity == "runtime" and spec.runs_here())


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchSettings:
    size: str = "realtext"
    bundles: tuple[Path, ...] = ()  # empty: export the default INT4 bundle into the cache
    formats: tuple[str, ...] = ("onnx",)  # what that default bundle holds (each format is one subject)
    peers: tuple[str, ...] = DEFAULT_PEERS
    repeats: int = 3
    threads: int = field(default_factory=default_threads)
    out: Path = Path("benchmarks/results")
    quick: bool = False
    fidelity: bool | None = None  # None: on at --size realtext, off at full (random weights)
    worker_timeout_s: float = 1800.0
    # a device profile whose backend_options each of our subjects is also measured with (a second subject per
    # format that the profile sets options for), e.g. raspberry-pi-5-4gb's vision_session=exclusive
    profile: str | None = None

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if not self.formats or "onnx" not in self.formats:
            raise ValueError(f"formats must include onnx (the reference subject), got {self.formats!r}")
        if self.repeats < 1 or self.threads < 1:
            raise ValueError("repeats and threads must be >= 1")

    @property
    def workload(self) -> Workload:
        return workload_for(self.size, self.quick)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bundles"] = [str(b) for b in self.bundles]
        d["out"] = str(self.out)
        d["workload"] = self.workload.to_dict()
        return d
