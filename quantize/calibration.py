"""Calibration activations for the calibrated quantizers (GPTQ, importance-weighted search).

The fp32 torch model reads the calibration text shipped in the package (``calibration/calibration.txt``:
English prose and ChatML chat turns, never the text ``smoledge fidelity`` scores; a test checks that no
8-token n-gram is shared).  For every ``nn.Linear`` of the text decoder and ``lm_head`` a forward hook
sums the Gram matrix ``X^T X`` of its input; the quantizers read it as a Hessian (GPTQ) or take its
diagonal as per-channel importance (llama.cpp's imatrix).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smoledge.errors import ConfigError

BUILTIN_TEXT = Path(__file__).parent / "calibration" / "calibration.txt"
DEFAULT_TOKENS = 2048
SEQUENCE = 512


@dataclass(frozen=True)
class CalibrationSpec:
    """Which text and how many tokens (recipe ``calibration``: {"text": "builtin" | path, "tokens": N})."""

    text: str = "builtin"
    tokens: int = DEFAULT_TOKENS

    @property
    def path(self) -> Path:
        return BUILTIN_TEXT if self.text == "builtin" else Path(self.text)

    def read(self) -> str:
        try:
            return self.path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read calibration text {self.path}: {err}",
                              hint="recipe calibration.text is 'builtin' or a path to a UTF-8 text file") from None

    def sha256(self) -> str:
        return hashlib.sha256(self.read().encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "sha256": self.sha256()}

    @classmethod
    def from_dict(cls, data: dict | None) -> "CalibrationSpec | None":
        if data is None:
            return None
        return cls(text=data.get("text", "builtin"), tokens=int(data.get("tokens", DEFAULT_TOKENS)))


@dataclass
class CalibrationStats:
    """Per linear (HF module name): the summed input Gram matrix and the token count behind it."""

    gram: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0

    def hessian(self, name: str) -> np.ndarray | None:
        g = self.gram.get(name)
        return None if g is None else g / max(self.tokens, 1)

    def importance(self, name: str) -> np.ndarray | None:
        """Mean square activation per input channel (llama.cpp's imatrix)."""
        h = self.hessian(name)
        return None if h is None else np.diag(h).astype(np.float32)

    def save(self, path: Path) -> None:
        np.savez(path, token_count=self.tokens, **{f"g:{k}": v for k, v in self.gram.items()})

    @classmethod
    def load(cls, path: Path) -> "CalibrationStats":
        with np.load(path) as data:
            return cls({k[2:]: data[k] for k in data.files if k.startswith("g:")}, int(data["token_count"]))


def token_ids(spec: CalibrationSpec, tokenizer_file: Path) -> list[list[int]]:
    """The calibration text as sequences of at most SEQUENCE tokens, ``spec.tokens`` in all."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(spec.read()).ids[: spec.tokens]
    return [ids[i:i + SEQUENCE] for i in range(0, len(ids), SEQUENCE)]


def collect(model, spec: CalibrationSpec, tokenizer_file: Path) -> CalibrationStats:
    """Run the fp32 text decoder (+ lm_head) of an HF SmolVLM model over the calibration text."""
    import torch

    stats = CalibrationStats()
    hooks = []

    def hook(name):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            gram = (x.T @ x).numpy()
            stats.gram[name] = stats.gram[name] + gram if name in stats.gram else gram
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".text_model." in f".{name}" or name == "lm_head"):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for seq in token_ids(spec, tokenizer_file):
                ids = torch.tensor([seq])
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
                stats.tokens += len(seq)
    finally:
        for h in hooks:
            h.remove()
    return stats


def collect_for(model, recipe, tokenizer_file: Path) -> CalibrationStats | None:
    """Calibration activations if any rule of ``recipe`` needs them, else None."""
    if recipe.calibration is None or not any(r.scheme.calibrated for r in recipe.rules):
        return None
    if not Path(tokenizer_file).is_file():
        raise ConfigError(f"calibrated quantization needs the tokenizer and {tokenizer_file} is missing",
                          hint="export from a checkpoint folder that has tokenizer.json")
    return collect(model, recipe.calibration, Path(tokenizer_file))
