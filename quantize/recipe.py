"""Quantization recipes as data.

A recipe is an ordered list of rules; each rule maps a weight-name pattern (HF parameter names, without
``.weight``: ``model.text_model.layers.3.mlp.down_proj``, ``lm_head``, ``model.text_model.embed_tokens``)
to a scheme.  The first matching rule wins; a weight no rule matches stays in float.  A recipe says
nothing about packing or backend: the ONNX, ExecuTorch and Core ML targets each map a scheme onto
their own quantizer, and the recipe is written verbatim into the bundle manifest.  One top-level key is not
about weights: ``kv_cache`` ("float32", the default, or "float16") is the ONNX decoder's KV cache dtype
(docs/decoder.md); the ExecuTorch and Core ML targets keep their own cache.  Another, ``formats``, names the
recipe a format uses instead of this one (``{"executorch": "int4", "coreml": "int4"}``: formats whose
quantizer computes its own round-to-nearest scales cannot take a calibrated recipe's grids, and would
otherwise get its layout by RTN); :meth:`Recipe.for_format` resolves it, following a fallback's own
``formats`` entry for the same format, and the artifact's manifest section records the recipe it took.

Built-in recipes live as JSON files in ``quantize/recipes/``; ``--quant NAME`` picks one, ``--quant
path/to/recipe.json`` loads your own (a fallback named by path is relative to the recipe file).
:data:`DEFAULT_RECIPE` is what ``smoledge export`` / ``run`` / the benchmarks use without ``--quant``.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from smoledge.errors import ConfigError
from smoledge.quantize.calibration import CalibrationSpec

RECIPE_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "int4-mixed"  # docs/quantization.md: KL 0.089 / top-1 83.0% at 4.96 bits per weight
ALGORITHMS = ("rtn", "hqq", "k-quant", "gptq", "importance")
CALIBRATED = ("gptq", "importance")  # read activations from the calibration text
SCALE_DTYPES = ("float32",)  # MatMulNBits scales take the activation type: fp32 graphs -> fp32 scales
# the ONNX decoder's KV cache (and its attention) dtype; the other targets keep their own cache
KV_CACHE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class Scheme:
    """How one weight is stored.  ``bits=None`` keeps it in float (``float_dtype``)."""

    bits: int | None = 4
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4  # ONNX Runtime MatMulNBits: 4 = int8 activations on CPU
    algorithm: str = "rtn"
    float_dtype: str = "float32"
    scale_dtype: str = "float32"
    act_order: bool = False  # gptq: round the loudest input channels first
    damp: float = 0.01  # gptq: added to H's diagonal, as a fraction of its mean


    def __post_init__(self):
        if self.bits not in (None, 4, 8):
            raise ConfigError(f"quantization bits must be 4, 8 or null (keep float), got {self.bits!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"unknown quantization algorithm {self.algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        if self.algorithm in ("hqq", "k-quant") and (self.symmetric or self.bits != 4):
            raise ConfigError(f"{self.algorithm} is 4-bit with zero points only",
                              hint='set "symmetric": false and "bits": 4, or use rtn / gptq / importance')
        if not 0 < self.damp <= 1:
            raise ConfigError(f"damp must be in (0, 1], got {self.damp}", hint="GPTQ's usual damping is 0.01")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale_dtype {self.scale_dtype!r} is not supported by the fp32 ONNX graphs",
                              hint=f"use one of {', '.join(SCALE_DTYPES)} (fp16 scales need an fp16-activation graph)")

    @property
    def zero_points(self) -> str:
        """none (symmetric), float (HQQ) or uint4/uint8 (integer, one per block)."""
        if self.keeps_float or self.symmetric:
            return "none"
        return "float" if self.algorithm == "hqq" else f"uint{self.bits}"

    @property
    def calibrated(self) -> bool:
        return not self.keeps_float and self.algorithm in CALIBRATED

    def rtn_layout(self) -> "Scheme":
        """The same bits, blocks and zero points by round-to-nearest: what a format whose quantizer
        computes its own scales from the float weights (Core ML, torchao) makes of a calibrated scheme."""
        return replace(self, algorithm="rtn") if self.calibrated else self

    @property
    def keeps_float(self) -> bool:
        return self.bits is None

    def label(self) -> str:
        if self.keeps_float:
            return self.float_dtype
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}-{kind}-b{self.block_size}-{self.algorithm}"


def use_more_bits(n_layers: int) -> tuple[int, ...]:
    """llama.cpp's ``use_more_bits`` (src/llama-quant.cpp): the first and last eighth of the layers and
    every third one between - where Q4_K_M gives ``attn_v`` / ``ffn_down`` more bits."""
    return tuple(i for i in range(n_layers)
                 if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2)


def first_last_eighth(n_layers: int) -> tuple[int, ...]:
    """The first and last eighth of the layers: ``use_more_bits`` without its every-third middle layers."""
    return tuple(i for i in range(n_layers) if i < n_layers // 8 or i >= 7 * n_layers // 8)


LAYER_SELECTORS = {"use_more_bits": use_more_bits, "first_last_eighth": first_last_eighth}
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
TEXT_LAYER_NAME = re.compile(r"(?:^|\.)text_model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Rule:
    """``match``: an fnmatch pattern over HF weight names.  ``layers`` optionally narrows it to the decoder
    layers a selector picks (one of :data:`LAYER_SELECTORS`), resolved against the model's layer count
    (:meth:`Recipe.for_layers`, which every quantizer applies) into ``layer_indices``.  ``rows``
    optionally narrows it to output rows ``[start, stop)`` of the weight (HF ``[out, in]`` layout; for
    ``lm_head`` the token ids): the weight is then split by rows, each part stored by the first rule that
    claims it (:meth:`Recipe.parts_for`).  Only the ONNX target splits a weight by rows."""

    match: str
    scheme: Scheme
    layers: str | None = None
    layer_indices: tuple[int, ...] | None = None
    rows: tuple[int, int] | None = None

    def __post_init__(self):
        if self.layers is not None and self.layers not in LAYER_SELECTORS:
            raise ConfigError(f"unknown layer selector {self.layers!r}",
                              hint=f"use one of {', '.join(LAYER_SELECTORS)} or list the layers in match patterns")
        if self.rows is not None:
            rows = self.rows
            if (not isinstance(rows, tuple) or len(rows) != 2 or not all(isinstance(r, int) for r in rows)
                    or not 0 <= rows[0] < rows[1]):
                raise ConfigError(f"rule {self.match!r}: rows must be [start, stop) with 0 <= start < stop, got {list(rows)!r}",
                                  hint='e.g. "rows": [0, 8192] for the first 8,192 output rows (token ids of lm_head)')

    def matches(self, weight_name: str) -> bool:
        if not fnmatch.fnmatchcase(weight_name, self.match):
            return False
        if self.layers is None:
            return True
        if self.layer_indices is None:
            raise ConfigError(f"rule {self.match!r} selects layers by {self.layers!r} and was not resolved",
                              hint="call Recipe.for_layers(n_layers) (or for_weights) before scheme_for")
        index = _LAYER_INDEX.search(weight_name)
        return index is not None and int(index.group(1)) in self.layer_indices

    def for_layers(self, n_layers: int) -> "Rule":
        if self.layers is None:
            return self
        return replace(self, layer_indices=LAYER_SELECTORS[self.layers](n_layers))

    def to_dict(self) -> dict:
        data = {"match": self.match}
        if self.layers is not None:
            data["layers"] = self.layers
            if self.layer_indices is not None:
                data["layer_indices"] = list(self.layer_indices)
        if self.rows is not None:
            data["rows"] = list(self.rows)
        return {**data, "scheme": {**asdict(self.scheme), "zero_points": self.scheme.zero_points}}

    @classmethod
    def from_dict(cls, data: dict) -> "Rule":
        indices, rows = data.get("layer_indices"), data.get("rows")
        if rows is not None and not isinstance(rows, (list, tuple)):
            raise ConfigError(f"rule {data.get('match')!r}: rows must be a list [start, stop), got {rows!r}")
        return cls(data["match"], Scheme(**_scheme_fields(data.get("scheme", {}))), data.get("layers"),
                   None if indices is None else tuple(int(i) for i in indices),
                   None if rows is None else tuple(rows))


def row_part_name(weight_name: str, start: int, stop: int) -> str:
    """The name of rows ``[start, stop)`` of a weight split by a ``rows`` rule (its graph node's name)."""
    return f"{weight_name}[{start}:{stop}]"


def whole_weight_name(name: str) -> str:
    """The weight a :func:`row_part_name` belongs to (the name itself for a whole weight)."""
    return name.split("[", 1)[0]


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    notes: dict = field(default_factory=dict)
    calibration: CalibrationSpec | None = None
    kv_cache: str = "float32"
    # format -> the recipe (built-in name or path) that format uses instead; data, as written in the recipe
    formats: dict[str, str] = field(default_factory=dict)
    # set on a format's fallback: the name of the recipe it stands in for (recorded in that format's manifest)
    replaces: str | None = None
    # format -> the resolved fallback (load_recipe fills it); not data, not compared
    fallbacks: dict[str, "Recipe"] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.kv_cache not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache {self.kv_cache!r} is not one of {', '.join(KV_CACHE_DTYPES)}",
                              hint='e.g. "kv_cache": "float16" at the top of the recipe')
        if self.calibration is None and any(r.scheme.calibrated for r in self.rules):
            object.__setattr__(self, "calibration", CalibrationSpec())
        _check_formats(self.name, self.formats)

    def for_format(self, fmt: str) -> "Recipe":
        """The recipe the ``fmt`` target applies: this one, or the fallback its ``formats`` names for ``fmt``
        (resolved by :func:`load_recipe`), with ``replaces`` saying which recipe it stands in for."""
        if fmt not in self.formats:
            return self
        if fmt not in self.fallbacks:
            raise ConfigError(f"recipe {self.name!r} names {self.formats[fmt]!r} for {fmt} but it was not resolved",
                              hint="load the recipe with smoledge.quantize.recipe.load_recipe")
        return self.fallbacks[fmt]

    def scheme_for(self, weight_name: str) -> Scheme | None:
        """The scheme of a whole weight.  A weight a ``rows`` rule matches has one per part: use
        :meth:`parts_for` (formats that cannot split a weight refuse such a recipe here)."""
        for rule in self.rules:
            if rule.matches(weight_name):
                if rule.rows is not None:
                    raise ConfigError(f"recipe {self.name!r} splits {weight_name} by rows (rule {rule.match!r}), "
                                      "which only the ONNX target can store",
                                      hint='name a recipe without "rows" rules for this format in the recipe\'s "formats"')
                return None if rule.scheme.keeps_float else rule.scheme
        return None

    def parts_for(self, weight_name: str, n_rows: int) -> list[tuple[int, int, Scheme | None]]:
        """How a weight of ``n_rows`` output rows is stored: ``(start, stop, scheme)`` parts in row order
        (``None``: float).  Rules are tried in order; a matching ``rows`` rule claims the rows of its range
        no earlier rule claimed, a matching rule without ``rows`` claims every row left.  Adjacent parts
        with one scheme are one part, so a weight no ``rows`` rule matches is one part ``(0, n_rows, ...)``."""
        claimed: list[tuple[int, int, Scheme | None]] = []
        open_rows = [(0, n_rows)]
        for rule in self.rules:
            if not open_rows:
                break
            if not rule.matches(weight_name):
                continue
            lo, hi = rule.rows or (0, n_rows)
            scheme = None if rule.scheme.keeps_float else rule.scheme
            left = []
            for a, b in open_rows:
                ca, cb = max(a, lo), min(b, hi)
                if ca >= cb:
                    left.append((a, b))
                    continue
                claimed.append((ca, cb, scheme))
                left += [r for r in ((a, ca), (cb, b)) if r[0] < r[1]]
            open_rows = left
        parts: list[tuple[int, int, Scheme | None]] = []
        for a, b, scheme in sorted(claimed + [(a, b, None) for a, b in open_rows], key=lambda p: p[0]):
            if parts and parts[-1][2] == scheme:
                parts[-1] = (parts[-1][0], b, scheme)
            else:
                parts.append((a, b, scheme))
        return parts

    @property
    def splits_rows(self) -> bool:
        return any(rule.rows is not None for rule in self.rules)

    def to_dict(self) -> dict:
        data = {"name": self.name, "description": self.description, "notes": dict(self.notes),
                "rules": [r.to_dict() for r in self.rules], "kv_cache": self.kv_cache}
        if self.calibration is not None:
            data["calibration"] = self.calibration.to_dict()
        if self.formats:
            data["formats"] = dict(self.formats)
        if self.replaces is not None:
            data["replaces"] = self.replaces
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        try:
            rules = tuple(Rule.from_dict(r) for r in data["rules"])
            return cls(name=data["name"], rules=rules, description=data.get("description", ""),
                       notes=data.get("notes", {}), calibration=CalibrationSpec.from_dict(data.get("calibration")),
                       kv_cache=data.get("kv_cache", "float32"), formats=_copied(data.get("formats") or {}),
                       replaces=data.get("replaces"))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"malformed quantization recipe: {err}",
                              hint="a recipe is {name, rules: [{match, scheme: {bits, block_size, ...}}]}") from None

    def with_rules_first(self, rules: tuple[Rule, ...], suffix: str) -> "Recipe":
        """The same recipe with ``rules`` tried before its own (e.g. a --vision-precision override); its
        formats' fallbacks get them too."""
        fallbacks = {fmt: r.with_rules_first(rules, suffix) for fmt, r in self.fallbacks.items()}
        replaces = None if self.replaces is None else f"{self.replaces}+{suffix}"
        return Recipe(f"{self.name}+{suffix}", tuple(rules) + self.rules, self.description, dict(self.notes),
                      self.calibration, self.kv_cache, dict(self.formats), replaces, fallbacks)

    def for_layers(self, n_layers: int) -> "Recipe":
        """Every rule's layer selector resolved against a decoder of ``n_layers`` layers."""
        return replace(self, rules=tuple(r.for_layers(n_layers) for r in self.rules))

    def for_weights(self, weight_names) -> "Recipe":
        """:meth:`for_layers` with the layer count read off the text decoder's weight names (one more than
        the highest ``text_model.layers.N``); unchanged when no rule has a selector or no name has a layer."""
        if all(r.layers is None or r.layer_indices is not None for r in self.rules):
            return self
        found = [int(m.group(1)) for n in weight_names if (m := TEXT_LAYER_NAME.search(n))]
        return self.for_layers(max(found) + 1) if found else self

    @property
    def is_float(self) -> bool:
        return all(rule.scheme.keeps_float for rule in self.rules)


def _copied(value):
    """A dict copied (a recipe's own, not the caller's); anything else as given, for the check to name it."""
    return dict(value) if isinstance(value, dict) else value


def _scheme_fields(data: dict) -> dict:
    """A scheme dict as written into a manifest: ``zero_points`` is derived, not a field."""
    return {k: v for k, v in data.items() if k != "zero_points"}


FLOAT = Scheme(bits=None)
INT8 = Scheme(bits=8, block_size=32, symmetric=False)
INT4 = Scheme(bits=4, block_size=32, symmetric=False)
PRECISIONS = {"fp32": FLOAT, "int8": INT8, "int4": INT4}
VISION_PATTERNS = ("model.vision_model.*", "model.connector.*")


def with_vision_precision(recipe: Recipe, precision: str | None) -> Recipe:
    """Override the recipe for the vision encoder and connector (``--vision-precision``)."""
    if precision is None:
        return recipe
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown vision precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    rules = tuple(Rule(p, PRECISIONS[precision]) for p in VISION_PATTERNS)
    return recipe.with_rules_first(rules, f"vision-{precision}")


@dataclass(frozen=True)
class QuantReport:
    """What a target made of a recipe: weights per scheme label and the bytes they are stored in
    (data + scales + zero points), so every format reports bits per weight the same way."""

    schemes: dict[str, int]
    weights: int
    weight_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes / self.weights if self.weights else 0.0

    def to_dict(self) -> dict:
        return {"schemes": self.schemes, "weights": self.weights, "weight_bytes": self.weight_bytes,
                "bits_per_weight": round(self.bits_per_weight, 3)}

    @classmethod
    def from_dict(cls, data: dict) -> QuantReport:
        return cls(dict(data.get("schemes", {})), int(data.get("weights", 0)), int(data.get("weight_bytes", 0)))

    @classmethod
    def combined(cls, reports) -> QuantReport:
        """One report over several graphs (e.g. the text path: embedding + decoder with lm_head)."""
        reports = list(reports)
        schemes: dict[str, int] = {}
        for r in reports:
            for label, count in r.schemes.items():
                schemes[label] = schemes.get(label, 0) + count
        return cls(schemes, sum(r.weights for r in reports), sum(r.weight_bytes for r in reports))


def _check_formats(name: str, formats) -> None:
    """A recipe's ``formats``: registered format -> a recipe name or path (a string)."""
    from smoledge.runtime.formats import FORMATS

    if not isinstance(formats, dict):
        raise ConfigError(f"recipe {name!r}: \"formats\" must map a format to a recipe, got {formats!r}",
                          hint='e.g. "formats": {"executorch": "int4", "coreml": "int4"}')
    for fmt, other in formats.items():
        if fmt not in FORMATS:
            raise ConfigError(f"recipe {name!r} names a fallback for {fmt!r}, which is not a format",
                              hint=f"formats are {', '.join(FORMATS)}")
        if not isinstance(other, str) or not other:
            raise ConfigError(f"recipe {name!r}: the {fmt} fallback must be a recipe name or path, got {other!r}")


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def _recipe_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        return RECIPE_DIR / f"{name_or_path}.json"
    return relative_to / path if relative_to is not None and not path.is_absolute() else path


def _read_recipe(path: Path, name_or_path: str | Path, named_by: str = "") -> Recipe:
    if not path.is_file():
        raise ConfigError(f"unknown quantization recipe {str(name_or_path)!r}{named_by}",
                          hint=f"use one of {', '.join(builtin_recipes())} or a path to a recipe .json")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read quantization recipe {path}: {err}") from None
    return Recipe.from_dict(data)


def _fallback(recipe: Recipe, path: Path, fmt: str) -> Recipe:
    """The recipe ``fmt`` ends on when it follows ``formats[fmt]`` from ``recipe`` (read from ``path``):
    every recipe on the way must exist, and none may come back (a cycle)."""
    chain, current, current_path = [path.resolve()], recipe, path
    while fmt in current.formats:
        ref = current.formats[fmt]
        next_path = _recipe_path(ref, current_path.parent)
        current = _read_recipe(next_path, ref, f" (the {fmt} fallback of recipe {current.name!r})")
        current_path = next_path
        if next_path.resolve() in chain:
            names = " -> ".join(p.stem for p in chain + [next_path.resolve()])
            raise ConfigError(f"recipe {recipe.name!r}: the {fmt} fallbacks form a cycle ({names})",
                              hint=f"end the chain on a recipe without a {fmt} entry in its \"formats\"")
        chain.append(next_path.resolve())
    return replace(current, replaces=recipe.name, fallbacks={})


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = _recipe_path(name_or_path)
    recipe = _read_recipe(path, name_or_path)
    return replace(recipe, fallbacks={fmt: _fallback(recipe, path, fmt) for fmt in recipe.formats})
