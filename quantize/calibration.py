"""Calibration activations for the calibrated quantizers (GPTQ, importance-weighted search).

The fp32 torch model reads the calibration text shipped in the package (``calibration/calibration.txt``:
English prose and ChatML chat turns, never the text ``smoledge fidelity`` scores; a test checks that no
8-token n-gram is shared).  For every ``nn.Linear`` of the text decoder and ``lm_head`` a forward hook
records its input; the quantizers read the summed Gram matrix ``X^T X`` as a Hessian (GPTQ) or take its
diagonal as per-channel importance (llama.cpp's imatrix).

The inputs go to files in a scratch folder under the quantization cache, not to RAM, and each Gram matrix
is formed only when its layer is quantized: at 8,192 tokens the 2.2B model's inputs are 5.6 GB on disk (bfloat16),
where its Gram matrices summed in float64 were ~15 GB of RAM held beside the fp32 model and the ONNX
decoder for the whole export (docs/quantization.md, "Calibration memory").
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smoledge.errors import ConfigError

BUILTIN_TEXT = Path(__file__).parent / "calibration" / "calibration.txt"
DEFAULT_TOKENS = 8192
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
    """Per linear (HF module name): the summed input Gram matrix and the token count behind it.

    ``source``, when known, is the sha256 of everything the Gram matrices are a function of (the text
    model's parameters, the tokenizer, the calibration text and token count): the quantization cache keys
    a calibrated result by it instead of by the matrices themselves."""

    gram: Mapping[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0
    source: str = ""

    def has(self, name: str) -> bool:
        return name in self.gram

    def hessian(self, name: str) -> np.ndarray | None:
        g = self.gram.get(name)
        if g is None:
            return None
        # a file-backed Gram is formed anew on each read: divide it in place instead of holding two
        fresh = isinstance(self.gram, ActivationGrams)
        return np.divide(g, max(self.tokens, 1), out=g if fresh else None)

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


@contextlib.contextmanager
def one_thread():
    """One torch intra-op thread for the calibration work: on a loaded two-core box two threads measured
    1.8x slower than one for the calibration forward and 2-7x for the grid search / GPTQ steps (threads
    waiting on each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ActivationGrams(Mapping):
    """Layer name -> summed Gram matrix, formed on each read from that layer's inputs, which lie in
    bfloat16 files of a scratch folder (removed with this object, or by the next collect once its writer
    has died).  Each sequence's ``X^T X`` is an fp32 product of the bf16-rounded inputs, the sum across
    sequences fp64: the matrices are those an in-memory sum of the same products gives.

    bfloat16 halves the scratch (the 2.2B model's inputs at 8,192 tokens: 5.6 GB instead of 11.3) and keeps
    float32's range, so no outlier channel overflows; its 8-bit significand rounds each input by at most
    2^-8 relative (to nearest even), which moved the real-text model's end-to-end KL by 0.003 nats, the
    size of the scoring's run-to-run spread (docs/quantization.md, "Tenth session")."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files: dict[str, Path] = {}  # layer -> its input's file (q/k/v, gate/up share one)
        self._widths: dict[Path, int] = {}
        self._finalizer = weakref.finalize(self, shutil.rmtree, folder, True)

    @classmethod
    def in_scratch(cls) -> "ActivationGrams":
        from smoledge.runtime.cache import cache_path, process_alive

        root = cache_path("quant")
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("collect-*"):  # a killed export's leftovers
            pid = old.name.split("-")[1]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        return cls(Path(tempfile.mkdtemp(prefix=f"collect-{os.getpid()}-", dir=root)))

    def append(self, name: str, rows: np.ndarray) -> None:
        """Add one sequence's inputs [tokens, K] of layer ``name``."""
        import torch

        path = self._files.setdefault(name, self.folder / f"{len(self._files)}.bf16")
        self._widths[path] = rows.shape[-1]
        bits = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
        with path.open("ab") as out:
            out.write(bits.numpy().data)

    def share(self, name: str, first: str) -> None:
        """``name`` reads the same tensor as ``first`` (q/k/v, gate/up): one file, one Gram."""
        self._files[name] = self._files[first]

    def __getitem__(self, name: str) -> np.ndarray:
        import torch

        path = self._files[name]
        rows = torch.from_numpy(np.fromfile(path, np.int16).reshape(-1, self._widths[path])).view(torch.bfloat16)
        gram = torch.zeros((rows.shape[1], rows.shape[1]), dtype=torch.float64)
        for start in range(0, rows.shape[0], SEQUENCE):
            flat = rows[start:start + SEQUENCE].float()
            gram += flat.T @ flat
        return gram.numpy()

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        self._finalizer()


def collect(model, spec: CalibrationSpec, tokenizer_file: Path) -> CalibrationStats:
    """Run the fp32 text decoder (+ lm_head) of an HF SmolVLM model over the calibration text."""
    import torch

    grams = ActivationGrams.in_scratch()
    stats = CalibrationStats(grams)
    hooks = []
    seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # this forward's inputs (held, so no address is reused)

    def hook(name):
        def record(_module, args):
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            if key in seen:
                grams.share(name, seen[key][0])
                return
            seen[key] = (name, x)
            grams.append(name, x.reshape(-1, x.shape[-1]).float().numpy())
        return record

    modules = dict(model.named_modules())
    names = _calibrated_modules(model)
    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad(), one_thread():
            for seq in token_ids(spec, tokenizer_file):
                ids = torch.tensor([seq])
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
                seen.clear()
                stats.tokens += len(seq)
    finally:
        for h in hooks:
            h.remove()
    return stats


class DeferredCalibration(CalibrationStats):
    """Calibration stats whose forward pass runs on the first :meth:`hessian` call: when every calibrated
    weight is in the quantization cache (keyed by ``source``), the model never reads the text."""

    def __init__(self, source: str, names: set[str], compute):
        super().__init__({}, 0, source)
        self._names, self._compute = names, compute

    def has(self, name: str) -> bool:
        return name in self._names

    def hessian(self, name: str) -> np.ndarray | None:
        self._collect()
        return super().hessian(name)

    def save(self, path: Path) -> None:
        self._collect()
        super().save(path)

    def _collect(self) -> None:
        if self._compute is not None:
            stats, self._compute = self._compute(), None
            self.gram, self.tokens = stats.gram, stats.tokens


# bump when collect() changes what it records
COLLECT_VERSION = 3  # 3: inputs stored as bfloat16


def _calibrated_modules(model) -> list[str]:
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and (".text_model." in f".{name}" or name == "lm_head")]


def source_key(model, spec: CalibrationSpec, tokenizer_file: Path) -> str:
    """sha256 of what :func:`collect` reads: the text model's parameters (and lm_head's), the tokenizer,
    the calibration text and its token count."""
    import torch

    digest = hashlib.sha256(f"collect-v{COLLECT_VERSION} tokens={spec.tokens} seq={SEQUENCE}".encode())
    digest.update(spec.sha256().encode())
    digest.update(Path(tokenizer_file).read_bytes())
    for name, param in model.named_parameters():
        if ".text_model." in f".{name}" or name.startswith("lm_head."):
            tensor = param.detach().contiguous()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().data)
    return digest.hexdigest()


def collect_for(model, recipe, tokenizer_file: Path) -> CalibrationStats | None:
    """Calibration activations if any rule of ``recipe`` needs them, else None; the forward pass is
    deferred until a quantizer asks for a Hessian the quantization cache does not already answer."""
    if recipe.calibration is None or not any(r.scheme.calibrated for r in recipe.rules):
        return None
    if not Path(tokenizer_file).is_file():
        raise ConfigError(f"calibrated quantization needs the tokenizer and {tokenizer_file} is missing",
                          hint="export from a checkpoint folder that has tokenizer.json")
    spec, tokenizer = recipe.calibration, Path(tokenizer_file)
    return DeferredCalibration(source_key(model, spec, tokenizer), set(_calibrated_modules(model)),
                               lambda: collect(model, spec, tokenizer))
