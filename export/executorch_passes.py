"""Source and graph transforms that keep more of each method inside the XNNPACK delegate.

Every op XNNPACK does not take splits the delegate in two and runs on ExecuTorch's portable kernels;
on SmolVLM the splits were the RMSNorm ``mean`` (3-D mean), the vision ``native_layer_norm``, the
attention's identity ``expand_copy`` and every reshape whose size is symbolic (the prefill length).
Module swaps on our own copy of the model (never on transformers' classes), one patch through
transformers' exporter patch registry and one edge pass fix those:

* :func:`delegate_friendly_modules`: LlamaRMSNorm / LayerNorm -> the same maths with the mean as a 4-D
  mean over dims (2, 3), which XNNPACK runs as a global average pool; transformers' tanh-approximated GELU
  (SigLIP's ``gelu_pytorch_tanh``) -> the explicit tanh formula, because XNNPACK's GELU ignores
  ``approximate="tanh"`` and silently computes the erf GELU (a 2e-3 relative logit error on the tiny model).
* :data:`PATCHES` (transformers' exporter patch registry, applied while the decoder is traced): Llama's
  ``rotate_half`` as a matmul with a constant signed permutation (exact in float32) instead of two
  slices on the dynamic-length q/k, which XNNPACK cannot slice (4 delegate splits per layer).
* :func:`delegate_friendly_views`: a reshape (or non-trailing unsqueeze) with one symbolic size becomes a
  reshape with ``-1`` there (XNNPACK takes one inferred dim), an ``expand_copy`` to its own shape is dropped.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

PATCHES = "smoledge.executorch"
# head dim -> the module being exported, which holds the rotation weight as a buffer
_ROTATIONS: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
_registered = False


def rotation_buffer(module: nn.Module, dim: int) -> None:
    """Register on ``module`` (the one being exported, so the tensor is one of its buffers rather than a
    stray constant) the weight W with ``linear(x, W) == cat(-x[..., h:], x[..., :h])`` (h = dim / 2),
    one +-1 per row, and make the patched ``rotate_half`` use it."""
    half = dim // 2
    weight = torch.zeros((dim, dim))
    weight[torch.arange(half), torch.arange(half) + half] = -1.0
    weight[torch.arange(half) + half, torch.arange(half)] = 1.0
    module.register_buffer("rotate_half_weight", weight, persistent=False)
    _ROTATIONS[dim] = module  # read through the module: torch.export swaps its buffers for traced ones


def _rotate_half_by_matmul(original):
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        owner = _ROTATIONS.get(x.shape[-1])
        if owner is None or x.dtype != owner.rotate_half_weight.dtype:
            return original(x)
        return torch.nn.functional.linear(x, owner.rotate_half_weight)

    return rotate_half


def register_patches() -> str:
    """Add our patches to transformers' exporter registry (once); returns the key for ``apply_patches``."""
    global _registered
    if not _registered:
        from transformers.exporters.utils import register_patch

        register_patch(PATCHES, "transformers.models.llama.modeling_llama.rotate_half")(_rotate_half_by_matmul)
        _registered = True
    return PATCHES


def _mean_last(x: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim as a 4-D mean over dims (2, 3), which XNNPACK runs (global average pool)."""
    pooled = x.reshape(1, -1, x.shape[-1], 1).mean(dim=(2, 3), keepdim=True)
    return pooled.reshape(*x.shape[:-1], 1)


class PooledRMSNorm(nn.Module):
    """LlamaRMSNorm, with its mean written so XNNPACK takes it (a portable ``mean`` splits the delegate)."""

    def __init__(self, norm):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(_mean_last(x * x) + self.eps))


class PooledLayerNorm(nn.Module):
    """nn.LayerNorm (last dim, affine) from ops XNNPACK runs; ``native_layer_norm`` has no XNNPACK kernel."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - _mean_last(x)
        return centred * torch.rsqrt(_mean_last(centred * centred) + self.eps) * self.weight + self.bias


class TanhGelu(nn.Module):
    """GELU, tanh approximation, from mul/add/tanh (all XNNPACK ops; ``pow`` only delegates for 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _twin(module: nn.Module) -> nn.Module | None:
    from transformers.activations import GELUTanh
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if isinstance(module, LlamaRMSNorm):
        return PooledRMSNorm(module)
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and len(module.normalized_shape) == 1:
        return PooledLayerNorm(module)
    if isinstance(module, GELUTanh):
        return TanhGelu()
    return None


def delegate_friendly_modules(model) -> int:
    """Swap the norms and tanh-GELUs of a (copied) model for their XNNPACK-friendly twins; returns the count."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            twin = _twin(child)
            if twin is not None:
                setattr(parent, name, twin)
                swapped += 1
    return swapped


def delegate_friendly_views(graph_module):
    """Edge pass: reshapes with one symbolic size -> that size inferred (``-1``); non-trailing
    ``unsqueeze`` -> the same reshape; identity ``expand`` -> its input.

    torch.export records ``x.view(1, seq, -1, dim)`` with the symbol ``seq``; XNNPACK rejects symbolic
    reshapes but takes one inferred dim, so the same reshape, spelled with the static head count and
    ``-1`` for ``seq``, stays inside the delegate.  XNNPACK unsqueezes only the trailing dim (rotary's
    ``cos.unsqueeze(1)`` is not), and has no ``expand``, which a 4-D matmul decomposes into."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from torch.fx.passes.infra.pass_base import PassResult

    view = exir_ops.edge.aten.view_copy.default
    changed = False
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function":
            continue
        target = str(node.target)
        if "expand_copy" in target and _same_static_shape(node.args[0], node):
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
            changed = True
        elif "view_copy" in target or "unsqueeze_copy" in target:
            shape = _one_inferred_dim(node)
            if shape is not None and (node.target != view or list(node.args[1]) != shape):
                node.target, node.args = view, (node.args[0], shape)
                changed = True
    graph_module.recompile()
    return PassResult(graph_module, changed)


def _one_inferred_dim(node) -> list[int] | None:
    """The node's output shape with its only symbolic size as -1 (None: static, or several symbols)."""
    shape = list(node.meta["val"].shape)
    symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
    if len(symbolic) != 1:
        return None
    shape[symbolic[0]] = -1
    return shape


def _same_static_shape(a, b) -> bool:
    sa, sb = a.meta["val"].shape, b.meta["val"].shape
    return all(isinstance(d, int) for d in (*sa, *sb)) and tuple(sa) == tuple(sb)
