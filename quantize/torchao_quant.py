"""Map a :class:`~smoledge.quantize.recipe.Recipe` onto torchao configs, for the ExecuTorch target.

:func:`torch_recipe` walks a (copied) HF model, asks the recipe for every ``nn.Linear`` and
``nn.Embedding`` by its HF module name, and says which torchao config each gets.  The mapping, chosen so
that XNNPACK runs what the recipe asks for:

================  ==============  =======================================================================
module            recipe scheme   torchao config
================  ==============  =======================================================================
``nn.Linear``     4 bits, block B ``Int8DynamicActivationIntxWeightConfig(int4, PerGroup(B), SYMMETRIC,
                                  weight_scale_dtype=bfloat16)`` (8-bit dynamic per-token activations;
                                  XNNPACK's blockwise 4-bit kernel takes symmetric weights only, so
                                  ``symmetric: false`` becomes symmetric, and keeps block scales in bfloat16,
                                  so they are rounded to bfloat16 here and eager torchao matches the .pte)
``nn.Linear``     8 bits          ``Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0), SYMMETRIC)``
                                  (XNNPACK's 8-bit kernel is per output channel, symmetric; the block size
                                  is unused)
``nn.Embedding``  4 or 8 bits     ``IntxWeightOnlyConfig(int4|int8, PerGroup(B), ASYMMETRIC|SYMMETRIC)``
                                  (fused into ``quantized_decomposed::embedding_4bit`` / ``embedding_byte``)
any               ``bits: null``  stays float32
================  ==============  =======================================================================

``algorithm: hqq`` maps to torchao's ``HQQ_SCALE_ONLY`` qparams (symmetric); a block size that does not
divide the input width falls back to per-channel.  Every such substitution is reported in
:meth:`TorchRecipe.to_dict`, which the bundle manifest records next to the recipe itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from smoledge.errors import ConfigError
from smoledge.quantize.recipe import Recipe, Scheme


@dataclass(frozen=True)
class TorchScheme:
    """What one module becomes: the torchao settings and a label for the manifest."""

    kind: str  # "linear" | "embedding"
    bits: int
    group_size: int | None  # None = per output channel
    symmetric: bool
    hqq: bool = False

    @property
    def bf16_scales(self) -> bool:
        """XNNPACK's blockwise (4-bit) linear kernel stores its scales in bfloat16."""
        return self.kind == "linear" and self.group_size is not None

    def label(self) -> str:
        if self.kind == "linear":
            prefix = f"8da{self.bits}w"
        else:
            prefix = f"embedding-int{self.bits}"
        grain = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"{prefix}-{'sym' if self.symmetric else 'asym'}-{grain}{'-hqq' if self.hqq else ''}"

    def config(self):
        import torch
        from torchao.quantization import (
            Int8DynamicActivationIntxWeightConfig,
            IntxWeightOnlyConfig,
            MappingType,
            PerAxis,
            PerGroup,
        )
        from torchao.quantization.quantize_.workflows import IntxChooseQParamsAlgorithm

        dtype = torch.int4 if self.bits == 4 else torch.int8
        grain = PerGroup(self.group_size) if self.group_size else PerAxis(0)
        mapping = MappingType.SYMMETRIC if self.symmetric else MappingType.ASYMMETRIC
        algo = IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if self.hqq else IntxChooseQParamsAlgorithm.AFFINE
        if self.kind == "linear":
            return Int8DynamicActivationIntxWeightConfig(
                weight_dtype=dtype, weight_granularity=grain, weight_mapping_type=mapping,
                weight_scale_dtype=torch.bfloat16 if self.bf16_scales else None, intx_choose_qparams_algorithm=algo)
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=grain, mapping_type=mapping,
                                    intx_choose_qparams_algorithm=algo)


@dataclass(frozen=True)
class Assignment:
    module: str
    asked: Scheme
    applied: TorchScheme
    notes: tuple[str, ...] = ()


def map_scheme(kind: str, scheme: Scheme, in_features: int) -> tuple[TorchScheme, tuple[str, ...]]:
    """One recipe scheme -> the torchao scheme XNNPACK can run, with the reasons for any difference."""
    notes = []
    group: int | None = scheme.block_size
    symmetric = scheme.symmetric
    hqq = scheme.algorithm == "hqq"
    if kind == "linear" and scheme.bits == 8:
        group = None
        notes.append("8-bit linears are per output channel on XNNPACK")
    if kind == "linear" and not symmetric:
        symmetric = True
        notes.append("XNNPACK's dynamically quantized linears take symmetric weights only")
    if hqq and not symmetric:
        symmetric = True
        notes.append("torchao's HQQ qparams are scale-only (symmetric)")
    if group and in_features % group:
        notes.append(f"block {group} does not divide {in_features}; per-channel instead")
        group = None
    applied = TorchScheme(kind, scheme.bits, group, symmetric, hqq)
    if applied.bf16_scales:
        notes.append("XNNPACK keeps block scales in bfloat16; they are rounded to bfloat16 at quantization")
    return applied, tuple(notes)


@dataclass(frozen=True)
class TorchRecipe:
    recipe: Recipe
    assignments: tuple[Assignment, ...]
    float_modules: tuple[str, ...]

    def apply(self, model) -> None:
        """Quantize ``model`` in place (give it a copy): one ``quantize_`` pass per distinct scheme."""
        from torchao.quantization import quantize_

        groups: dict[TorchScheme, set[str]] = {}
        for a in self.assignments:
            groups.setdefault(a.applied, set()).add(a.module)
        for scheme, names in groups.items():
            quantize_(model, scheme.config(), filter_fn=lambda _m, fqn, names=names: fqn in names)

    @property
    def is_float(self) -> bool:
        return not self.assignments

    def to_dict(self) -> dict:
        """The manifest's record: counts per applied scheme and each recipe-scheme -> torchao mapping."""
        mapping: dict[tuple[str, str, str], set[str]] = {}
        for a in self.assignments:
            key = (a.asked.label(), a.applied.label(), a.applied.kind)
            mapping.setdefault(key, set()).update(a.notes)
        counts = Counter(a.applied.label() for a in self.assignments)
        counts["float32"] = len(self.float_modules)
        return {
            "schemes": dict(counts),
            "mapping": [{"recipe": asked, "module_kind": kind, "torchao": applied, "notes": sorted(notes)}
                        for (asked, applied, kind), notes in sorted(mapping.items())],
        }


def torch_recipe(recipe: Recipe, model) -> TorchRecipe:
    """Which torchao config each Linear / Embedding of ``model`` (HF names) gets under ``recipe``."""
    from torch import nn

    assignments, floats = [], []
    recipe = recipe.for_weights(name for name, _ in model.named_modules())
    for name, module in model.named_modules():
        kind = "linear" if isinstance(module, nn.Linear) else "embedding" if isinstance(module, nn.Embedding) else None
        if kind is None:
            continue
        scheme = recipe.scheme_for(name)
        if scheme is None:
            floats.append(name)
            continue
        if scheme.bits not in (4, 8):
            raise ConfigError(f"the ExecuTorch target cannot store {name} in {scheme.bits} bits",
                              hint="use 4, 8 or null (float) in the recipe")
        applied, notes = map_scheme(kind, scheme, module.weight.shape[1])
        assignments.append(Assignment(name, scheme, applied, notes))
    return TorchRecipe(recipe, tuple(assignments), tuple(floats))
