"""The three ExecuTorch methods, as ExecuTorch's LLM runners call them.

* ``vision_encoder``: pixel_values [1,3,S,S] float32 (one tile) -> image features [1, image_seq_len,
  hidden].  One 4-D input, as ExecuTorch's C++ ``MultimodalRunner`` sends; static shape, so the whole
  method is one XNNPACK partition.  Every SmolVLM tile is whole, so the patch positions are a constant
  (computed once by :class:`~smoledge.export.graphs.VisionEncoderGraph`'s own code: no ``bucketize``) and
  there is no attention mask.
* ``token_embedding``: input_ids [1,S] int64 -> embeddings [1,S,hidden].  Calls ``F.embedding`` without
  SmolVLM's ``padding_idx`` (it only matters for gradients), so a quantized table fuses into
  ``quantized_decomposed::embedding_4bit``.
* ``text_decoder``: embeddings [1,S,hidden] + cache_position [S] int64 -> logits [1,vocab] of the last
  position.  The KV cache is a static buffer per layer inside the program, written in place by
  ExecuTorch's ``llama::update_cache`` and read by ``llama::custom_sdpa``, which attends to positions
  ``<= start_pos + i`` only (no mask, no full-cache copy).  The model's own HF decoder layers run
  unchanged; the custom attention is plugged in through transformers' ``AttentionInterface``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smoledge.export.graphs import VisionEncoderGraph, text_shape

ATTENTION_NAME = "smoledge_executorch_sdpa"


def load_custom_ops() -> None:
    """Register ExecuTorch's llama custom ops (``update_cache``, ``custom_sdpa``) with torch."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def custom_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function over the static cache; ``key``/``value`` are the whole caches
    [1, max_len, kv_heads, head_dim] returned by :class:`StaticCustomCache`."""
    out = torch.ops.llama.custom_sdpa(query.transpose(1, 2), key, value, kwargs["start_pos"], None, 0.0, True,
                                      scaling)
    return out, None


def register_attention() -> None:
    from transformers import AttentionInterface

    load_custom_ops()
    AttentionInterface.register(ATTENTION_NAME, custom_sdpa_attention)


class StaticCustomCache:
    """The cache object the HF attention layers call: writes the new keys/values in place at
    ``start_pos`` and hands back the whole buffers."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], start_pos):
        self.keys, self.values, self.start_pos = keys, values, start_pos

    def update(self, key, value, layer_idx, *args, **kwargs):
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        torch.ops.llama.update_cache(key.transpose(1, 2), k_cache, self.start_pos)
        torch.ops.llama.update_cache(value.transpose(1, 2), v_cache, self.start_pos)
        return k_cache, v_cache


class VisionTilesGraph(nn.Module):
    """:class:`VisionEncoderGraph` for whole tiles: with an all-true mask the patch positions are a
    constant (computed by the same code, once) and the attention mask is empty, so neither is traced."""

    def __init__(self, model):
        super().__init__()
        self.tiles = VisionEncoderGraph(model)
        per_side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        positions = self.tiles.patch_positions(torch.ones((1, per_side, per_side), dtype=torch.bool))
        self.register_buffer("position_ids", positions, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.tiles.vision
        emb = vision.embeddings
        hidden = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2).contiguous()
        hidden = hidden + emb.position_embedding(self.position_ids)
        for layer in vision.encoder.layers:
            hidden = layer(hidden, attention_mask=None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.tiles.connector(vision.post_layernorm(hidden))


class TokenEmbeddingGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.model.text_model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed.weight)


class StaticCacheDecoder(nn.Module):
    """HF text decoder + lm_head over a static KV cache of ``max_len`` positions (batch 1)."""

    def __init__(self, model, max_len: int):
        super().__init__()
        self.text = model.model.text_model
        self.lm_head = model.lm_head
        self.max_len = max_len
        ts = text_shape(model)
        shape = (1, max_len, ts.num_kv_heads, ts.head_dim)
        for i in range(ts.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)
        self.num_layers = ts.num_layers

    def caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return ([getattr(self, f"k_cache_{i}") for i in range(self.num_layers)],
                [getattr(self, f"v_cache_{i}") for i in range(self.num_layers)])

    def reset(self) -> None:
        for buf in (*self.caches()[0], *self.caches()[1]):
            buf.zero_()

    def forward(self, inputs_embeds: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        start_pos = cache_position[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos + inputs_embeds.shape[1] <= self.max_len)
        cache = StaticCustomCache(*self.caches(), start_pos)
        position_ids = cache_position[None, :]
        hidden = inputs_embeds
        rope = self.text.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.text.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=position_ids, cache=cache, use_cache=True,
                           position_embeddings=rope, start_pos=start_pos)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.lm_head(self.text.norm(hidden[:, -1, :]))


def use_custom_attention(model) -> None:
    """Point the (copied) model's text layers at the custom-op attention."""
    register_attention()
    model.config.text_config._attn_implementation = ATTENTION_NAME
