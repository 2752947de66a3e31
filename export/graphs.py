"""Export-friendly views of a SmolVLM model: the three graphs the bundle carries.

The names follow the onnx-community SmolVLM exports so existing ONNX consumers recognise them:

* ``vision_encoder``: pixel_values [N,3,H,W] + pixel_attention_mask [N,H,W] -> image_features
  [N, image_seq_len, text_hidden].  The runtime sends only real tiles, so HF's data-dependent removal of
  padding images is not traced; ``bucketize`` becomes a comparison count (identical results, and an op
  every backend has).
* ``embed_tokens``: input_ids [B,S] -> inputs_embeds [B,S,D].
* ``decoder_model_merged`` is not traced: :mod:`smoledge.export.onnx_decoder` builds it for ONNX Runtime
  (GroupQueryAttention over a shared KV buffer); its cache names are these modules' ``past_names`` /
  ``present_names``.

Every module here wraps the model's own submodules: the weights are the model's, the parity tests
compare each graph with transformers eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TextShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


def text_shape(model) -> TextShape:
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return TextShape(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, cfg.hidden_size, cfg.vocab_size)


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


class VisionEncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        inner = model.model
        self.vision = inner.vision_model
        self.connector = inner.connector
        self.patch_size = model.config.vision_config.patch_size
        self.per_side = model.config.vision_config.image_size // self.patch_size
        # Evaluated here, as HF evaluates it: a float arange's length depends on rounding, which an
        # exported Range op would redo differently.
        boundaries = torch.arange(1 / self.per_side, 1.0, 1 / self.per_side, dtype=torch.float32)
        self.register_buffer("boundaries", boundaries, persistent=False)

    def patch_positions(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """HF's fractional-coordinate bucketing, with bucketize as a count of boundaries <= x."""
        n, rows, cols = patch_mask.shape
        boundaries = self.boundaries
        step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)
        step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)
        frac_h = torch.arange(rows, dtype=torch.float32)[None, :] * step_h[:, None]
        frac_w = torch.arange(cols, dtype=torch.float32)[None, :] * step_w[:, None]
        frac_h = torch.clamp(frac_h, max=1.0 - 1e-6)
        frac_w = torch.clamp(frac_w, max=1.0 - 1e-6)
        bucket_h = (frac_h[..., None] >= boundaries).sum(-1)
        bucket_w = (frac_w[..., None] >= boundaries).sum(-1)
        pos = (bucket_h[:, :, None] * self.per_side + bucket_w[:, None, :]).reshape(n, -1)
        return torch.where(patch_mask.reshape(n, -1), pos, torch.zeros_like(pos))

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
        n, _, height, width = pixel_values.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        pixel_mask = pixel_attention_mask[:, : rows * p, : cols * p].to(torch.int32)
        patch_mask = pixel_mask.reshape(n, rows, p, cols, p).sum(dim=(2, 4)) > 0

        emb = self.vision.embeddings
        hidden = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        hidden = hidden + emb.position_embedding(self.patch_positions(patch_mask))

        keep = patch_mask.reshape(n, 1, 1, -1)
        mask = torch.zeros(keep.shape, dtype=hidden.dtype).masked_fill(~keep, torch.finfo(hidden.dtype).min)
        for layer in self.vision.encoder.layers:
            hidden = layer(hidden, attention_mask=mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = self.vision.post_layernorm(hidden)
        return self.connector(hidden)


class EmbedTokensGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.model.text_model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)
