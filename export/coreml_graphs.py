"""The torch modules the Core ML target converts: views of a SmolVLM made for ``ct.convert``.

Three models, as in the ONNX bundle, each wrapping the HF model's own submodules (the weights are the
model's; the parity tests compare each with transformers eager):

* :class:`CoreMLVisionEncoder`: one tile ``pixel_values [1,3,T,T]`` -> ``image_features [1, seq, D]``.
  The runtime sends full tiles only (SmolVLM never pads one), so there is no pixel mask and the patch
  positions are a constant.  Captured with ``torch.export``: HF's pixel shuffle computes
  ``int(seq**0.5)``, which ``torch.jit.trace`` records as a dynamic op coremltools cannot convert.
* :class:`CoreMLEmbedTokens`: ``input_ids [1,S]`` -> ``inputs_embeds [1,S,D]``.
* :class:`StatefulDecoder`: ``inputs_embeds [1,S,D]``, ``position_ids [1,S]`` and an additive
  ``causal_mask [1,1,S,T]`` over everything the cache holds after this call -> ``logits [1,S,V]``.
  The KV cache is two fp16 buffers ``[layers, kv_heads, capacity, head_dim]`` the module owns and
  writes in place at ``[T-S, T)``; Core ML turns them into model state (``ct.StateType``; Core ML
  state must be fp16, HF's ``StaticCache`` is not).  The attention is written out here over the HF
  layers' own projections, norms and MLPs, with RoPE read from tables precomputed by the model's own
  rotary embedding: HF's ``rotate_half`` slices at ``x.shape[-1] // 2``, which does not survive
  ``torch.jit.trace`` into coremltools.  One model does prefill (S > 1) and decode (S = 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from smoledge.export.graphs import EmbedTokensGraph, VisionEncoderGraph, text_shape

# Masked scores: far below any real score (exp underflows to 0) yet finite in fp16 after adding a
# score, so no -inf ever enters the softmax.
MASK_VALUE = -30000.0
KEY_CACHE = "key_cache"
VALUE_CACHE = "value_cache"


class CoreMLVisionEncoder(nn.Module):
    """:class:`VisionEncoderGraph` for one full tile.  With no padding the patch positions are a constant,
    evaluated here in float32 as HF does: left in the graph, coremltools folds HF's fractional bucketing
    in fp16 and picks other buckets (test_coreml_numerics caught it)."""

    def __init__(self, model):
        super().__init__()
        graph = VisionEncoderGraph(model)
        self.vision, self.connector = graph.vision, graph.connector
        rows = model.config.vision_config.image_size // graph.patch_size
        with torch.no_grad():
            positions = graph.patch_positions(torch.ones(1, rows, rows, dtype=torch.bool))
        self.register_buffer("positions", positions, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.vision.embeddings
        hidden = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2) + emb.position_embedding(self.positions)
        for layer in self.vision.encoder.layers:
            hidden = layer(hidden, attention_mask=None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.connector(self.vision.post_layernorm(hidden))


class CoreMLEmbedTokens(EmbedTokensGraph):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids.long())


def rope_tables(model, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[capacity, head_dim]`` for every position, from the model's own rotary embedding."""
    text = model.model.text_model
    positions = torch.arange(capacity)[None, :]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = text.rotary_emb(probe, position_ids=positions)
    return cos[0].float(), sin[0].float()


def additive_causal_mask(past: int, query: int, dtype=torch.float32) -> torch.Tensor:
    """``[1,1,S,P+S]``: 0 where query ``i`` (at position ``past + i``) may see a key, ``MASK_VALUE``
    elsewhere (the runtime builds the same mask in numpy)."""
    q_pos = torch.arange(query)[:, None] + past
    k_pos = torch.arange(past + query)[None, :]
    mask = torch.zeros(query, past + query, dtype=dtype).masked_fill(k_pos > q_pos, MASK_VALUE)
    return mask[None, None]


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """HF's RMSNorm (``weight * x / sqrt(mean(x**2) + eps)``) computed on ``x / max|x|``, so it stays finite
    in fp16: SmolLM2's residual stream holds values near 25,000, whose squares overflow fp16 (65,504)."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    scale = x.abs().amax(dim=-1, keepdim=True) + 1.0  # > 0; not clamp(): its open max overflows fp16
    unit = x / scale
    tiny = (math.sqrt(eps) / scale).pow(2)  # eps / scale**2, underflowing to 0 in fp16 rather than inf
    return norm.weight * (unit * torch.rsqrt(unit.pow(2).mean(dim=-1, keepdim=True) + tiny))


class StatefulDecoder(nn.Module):
    def __init__(self, model, capacity: int, cache_dtype: torch.dtype = torch.float16):
        super().__init__()
        text = model.model.text_model
        shape = text_shape(model)
        self.layers = text.layers
        self.norm = text.norm
        self.lm_head = model.lm_head
        self.capacity = capacity
        self.heads = model.config.text_config.num_attention_heads
        self.kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.half = shape.head_dim // 2
        self.scale = shape.head_dim ** -0.5
        cos, sin = rope_tables(model, capacity)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        cache_shape = (shape.num_layers, shape.num_kv_heads, capacity, shape.head_dim)
        self.register_buffer(KEY_CACHE, torch.zeros(cache_shape, dtype=cache_dtype))
        self.register_buffer(VALUE_CACHE, torch.zeros(cache_shape, dtype=cache_dtype))

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def forward(self, inputs_embeds, position_ids, causal_mask):
        total = causal_mask.shape[-1]
        past = total - inputs_embeds.shape[1]
        positions = position_ids[0].long()
        cos = self.rope_cos[positions][None, :, None, :].to(inputs_embeds.dtype)
        sin = self.rope_sin[positions][None, :, None, :].to(inputs_embeds.dtype)
        hidden = inputs_embeds
        for index, layer in enumerate(self.layers):
            attn_in = rms_norm(layer.input_layernorm, hidden)
            hidden = hidden + self._attention(index, layer.self_attn, attn_in, cos, sin, causal_mask, past, total)
            hidden = hidden + layer.mlp(rms_norm(layer.post_attention_layernorm, hidden))
        return self.lm_head(rms_norm(self.norm, hidden))

    def _rotate(self, x, cos, sin):
        rotated = torch.cat((-x[..., self.half:], x[..., : self.half]), dim=-1)
        return x * cos + rotated * sin

    def _attention(self, index, attn, hidden, cos, sin, mask, past, total):
        groups = self.heads // self.kv_heads
        query = self._rotate(attn.q_proj(hidden).view(1, -1, self.heads, self.head_dim), cos, sin)
        key = self._rotate(attn.k_proj(hidden).view(1, -1, self.kv_heads, self.head_dim), cos, sin)
        value = attn.v_proj(hidden).view(1, -1, self.kv_heads, self.head_dim)
        self.key_cache[index, :, past:total] = key[0].transpose(0, 1).to(self.key_cache.dtype)
        self.value_cache[index, :, past:total] = value[0].transpose(0, 1).to(self.value_cache.dtype)
        keys = self.key_cache[index, :, :total].to(hidden.dtype)[:, None]  # [kv, 1, T, d]
        values = self.value_cache[index, :, :total].to(hidden.dtype)[:, None]
        # query heads kv*groups + g share kv head kv (HF's repeat_kv), without copying the cache
        query = (query[0] * self.scale).view(-1, self.kv_heads, groups, self.head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(query, keys.transpose(-1, -2)) + mask[0]  # [kv, g, S, T]
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, values).permute(2, 0, 1, 3).reshape(1, -1, self.heads * self.head_dim)
        return attn.o_proj(out)
