"""The ONNX decoder built for ONNX Runtime, op by op, from the model's own weights (not traced).

The shape of onnxruntime-genai's model builder (``src/python/py/models/builder.py``) for Llama-family decoders:

* attention is ``com.microsoft.GroupQueryAttention`` with rotary inside it (``do_rotary``: cos/sin caches
  computed by the model's own rotary module, so rope scaling is the model's), positions from ``seqlens_k``;
* ``past_key_values.*`` / ``present.*`` are one preallocated buffer per layer and kind,
  [batch, kv_heads, kv_capacity, head_dim]: bound as both input and output, GQA writes the new positions in
  place (past_present_share_buffer) and nothing is concatenated or copied per step;
* ``attention_mask`` [batch, total_sequence_length] (right padding only) gives ``seqlens_k`` (valid length - 1
  per row) and ``total_sequence_length`` (its width);
* ``logits_to_keep`` [1] (int64): logits of the last that many positions only. Generation asks for 1 (prefill
  included); fidelity scoring asks for every position.
* RMS norms fused with the residual adds (``SkipSimplifiedLayerNormalization``).
* ``kv_cache`` (the recipe's): "float32", or "float16" -- the past/present buffers in fp16 and the attention
  with them (onnxruntime 1.22, the runtime floor, binds GQA's q/k/v, caches and cos/sin to one type): q/k/v
  are cast to fp16 before each GQA and its context back to fp32 after it (docs/decoder.md, "KV cache precision").

Each weight ``MatMul`` is named after its HF module (``model.text_model.layers.0.self_attn.q_proj``, ``lm_head``),
the names quantization recipes match, so ``quantize/onnx_quant.py`` applies to this graph as to a traced one.
"""

from __future__ import annotations

import numpy as np
import torch

from smoledge.export.graphs import past_names, present_names, text_shape
from smoledge.quantize.recipe import KV_CACHE_DTYPES

FLOAT, FLOAT16, INT64, INT32 = "FLOAT", "FLOAT16", "INT64", "INT32"
TYPES = {"float32": FLOAT, "float16": FLOAT16, "int64": INT64}  # the manifest's dtype names -> ONNX types
OPSET = 21
MS = "com.microsoft"
SUPPORTED = ("llama",)


def decoder_io(model) -> tuple[dict[str, list], dict[str, list]]:
    """The graph's inputs and outputs with their symbolic shapes (what the manifest records)."""
    ts = text_shape(model)
    kv = ["batch_size", ts.num_kv_heads, "kv_capacity", ts.head_dim]
    inputs = {"inputs_embeds": ["batch_size", "sequence_length", ts.hidden_size],
              "attention_mask": ["batch_size", "total_sequence_length"],
              "logits_to_keep": [1]}
    inputs.update({name: kv for name in past_names(ts.num_layers)})
    outputs = {"logits": ["batch_size", "logits_length", ts.vocab_size]}
    outputs.update({name: kv for name in present_names(ts.num_layers)})
    return inputs, outputs


def decoder_dtypes(model, kv_cache: str = "float32") -> dict[str, str]:
    """Every input's and output's dtype by name (numpy's names, what the manifest records)."""
    inputs, outputs = decoder_io(model)
    kinds = {"inputs_embeds": "float32", "attention_mask": "int64", "logits_to_keep": "int64", "logits": "float32"}
    return {name: kinds.get(name, kv_cache) for name in [*inputs, *outputs]}


class _Builder:
    """Nodes and initializers of one graph, written through onnx_ir's tape."""

    def __init__(self):
        import onnx_ir as ir
        from onnx_ir import tape

        self.ir = ir
        self.tape = tape.Tape()
        self.initializers: list = []

    def value(self, name: str, dtype: str, shape: list):
        ir = self.ir
        return ir.Value(name=name, type=ir.TensorType(getattr(ir.DataType, dtype)), shape=ir.Shape(shape))

    def weight(self, name: str, array) -> object:
        ir = self.ir
        if isinstance(array, torch.Tensor) and (array.dtype != torch.float32 or not array.is_contiguous()):
            # a transposed (or cast) view of the model's weight: made when the graph is written, one tensor at
            # a time, so the graph never holds an fp32 copy of every weight beside the model (6.8 GB at 2.2B)
            view = array.detach()
            tensor = ir.LazyTensor(lambda: ir.tensor(view.to(torch.float32).contiguous().numpy(), name=name),
                                   dtype=ir.DataType.FLOAT, shape=ir.Shape(tuple(view.shape)), name=name)
        else:
            if isinstance(array, torch.Tensor):
                array = array.detach().numpy()  # contiguous fp32: a view of the model's own storage
            tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(name=name, const_value=tensor)
        value.type, value.shape = ir.TensorType(value.const_value.dtype), ir.Shape(value.const_value.shape)
        self.initializers.append(value)
        return value

    def op(self, op_type: str, inputs, attrs=None, *, domain: str = "", name: str | None = None, outputs=None):
        if outputs is not None:
            return self.tape.op_multi_out(op_type, inputs, attrs, outputs=outputs, domain=domain, name=name)
        return self.tape.op(op_type, inputs, attrs, domain=domain, name=name)

    def op_n(self, op_type: str, inputs, attrs=None, *, n: int, domain: str = "", name: str | None = None):
        return self.tape.op_multi_out(op_type, inputs, attrs, num_outputs=n, domain=domain, name=name)

    def linear(self, x, module: torch.nn.Module, name: str):
        """x @ W.T (+ b): a MatMul named after the HF module, reading its weight as an initializer."""
        y = self.op("MatMul", [x, self.weight(f"{name}.weight", module.weight.detach().T)], name=name)
        if getattr(module, "bias", None) is not None:
            y = self.op("Add", [y, self.weight(f"{name}.bias", module.bias)], name=f"{name}.bias_add")
        return y


def _rotary_caches(text, head_dim: int, capacity: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [capacity, head_dim/2] from the model's rotary module (its theta, scaling and attention factor)."""
    positions = torch.arange(capacity)[None]
    probe = torch.zeros(1, 1, head_dim)
    with torch.no_grad():
        cos, sin = text.rotary_emb(probe, position_ids=positions)
    half = head_dim // 2
    return cos[0, :, :half].float().numpy().astype(dtype), sin[0, :, :half].float().numpy().astype(dtype)


def _lengths(b: _Builder, attention_mask):
    """seqlens_k [B] int32 (valid length - 1 per row) and total_sequence_length (scalar int32)."""
    total = b.op("ReduceSum", [attention_mask, b.weight("one_axis", np.array([1], np.int64))], {"keepdims": 0})
    seqlens = b.op("Cast", [b.op("Sub", [total, b.weight("one_i64", np.array(1, np.int64))])], {"to": 6})
    width = b.op("Gather", [b.op("Shape", [attention_mask]), b.weight("dim1", np.array(1, np.int64))], {"axis": 0})
    return seqlens, b.op("Cast", [width], {"to": 6})


def _attention(b: _Builder, x, layer, i: int, n_heads: int, ts, past: tuple, present: tuple, lengths, rotary,
               kv_type: str = FLOAT):
    """q/k/v projections -> GroupQueryAttention (rotary inside, writes the past buffers in place) -> o_proj;
    in ``kv_type`` (the caches' type: q/k/v cast to it before, the context cast back to fp32 after)."""
    attn = layer.self_attn
    prefix = f"model.text_model.layers.{i}.self_attn"
    qkv = [b.linear(x, getattr(attn, p), f"{prefix}.{p}") for p in ("q_proj", "k_proj", "v_proj")]
    if kv_type != FLOAT:
        to = getattr(b.ir.DataType, kv_type).value
        qkv = [b.op("Cast", [t], {"to": to}, name=f"{prefix}.{p}.to_{kv_type.lower()}")
               for t, p in zip(qkv, ("q", "k", "v"))]
    context = b.value(f"{prefix}.context", kv_type, ["batch_size", "sequence_length", n_heads * ts.head_dim])
    b.op("GroupQueryAttention", [*qkv, *past, *lengths, *rotary],
         {"num_heads": n_heads, "kv_num_heads": ts.num_kv_heads, "do_rotary": 1, "rotary_interleaved": 0,
          "scale": float(attn.scaling)}, domain=MS, name=f"{prefix}.gqa", outputs=[context, *present])
    if kv_type != FLOAT:
        context = b.op("Cast", [context], {"to": b.ir.DataType.FLOAT.value}, name=f"{prefix}.context.to_float")
    return b.linear(context, attn.o_proj, f"{prefix}.o_proj")


def _mlp(b: _Builder, x, layer, i: int):
    """down(silu(gate(x)) * up(x))."""
    mlp = layer.mlp
    prefix = f"model.text_model.layers.{i}.mlp"
    gate = b.linear(x, mlp.gate_proj, f"{prefix}.gate_proj")
    up = b.linear(x, mlp.up_proj, f"{prefix}.up_proj")
    silu = b.op("Mul", [gate, b.op("Sigmoid", [gate])])
    return b.linear(b.op("Mul", [silu, up]), mlp.down_proj, f"{prefix}.down_proj")


def _norm(b: _Builder, x, residual, norm: torch.nn.Module, name: str):
    """RMS norm of x (+ residual): (normed, the sum it normed, the next residual)."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    gamma = b.weight(f"{name}.weight", norm.weight)
    if residual is None:
        return b.op("SimplifiedLayerNormalization", [x, gamma], {"epsilon": eps, "axis": -1, "stash_type": 1},
                    name=name), x
    normed, _, _, summed = b.op_n("SkipSimplifiedLayerNormalization", [x, residual, gamma], {"epsilon": eps},
                                  n=4, domain=MS, name=name)
    return normed, summed


def _check_supported(model) -> None:
    cfg = model.config.text_config
    if cfg.model_type not in SUPPORTED or getattr(cfg, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"the ONNX decoder builder knows {', '.join(SUPPORTED)} (silu) text models, "
                                  f"not {cfg.model_type}")


def build(model, kv_capacity: int | None = None, kv_cache: str = "float32"):
    """The decoder as an onnx_ir Model (weights held as in-memory initializers). ``kv_capacity`` bounds the
    rotary caches: the most positions a sequence may reach (default: the model's max_position_embeddings).
    ``kv_cache``: the past/present buffers' dtype, "float32" or "float16" (the attention runs in it)."""
    _check_supported(model)
    import onnx_ir as ir

    if kv_cache not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache {kv_cache!r} is not one of {', '.join(KV_CACHE_DTYPES)}")

    cfg, ts = model.config.text_config, text_shape(model)
    text = model.model.text_model
    capacity = kv_capacity or cfg.max_position_embeddings
    b = _Builder()
    in_shapes, out_shapes = decoder_io(model)
    dtypes = decoder_dtypes(model, kv_cache)
    inputs = {name: b.value(name, TYPES[dtypes[name]], shape) for name, shape in in_shapes.items()}
    outputs = {name: b.value(name, TYPES[dtypes[name]], shape) for name, shape in out_shapes.items()}
    lengths = _lengths(b, inputs["attention_mask"])
    rotary = [b.weight(f"rotary.{kind}_cache", c) for kind, c in
              zip(("cos", "sin"), _rotary_caches(text, ts.head_dim, capacity, np.dtype(kv_cache)))]
    hidden, residual = inputs["inputs_embeds"], None
    past, present = past_names(ts.num_layers), present_names(ts.num_layers)
    for i, layer in enumerate(text.layers):
        x, residual = _norm(b, hidden, residual, layer.input_layernorm, f"model.text_model.layers.{i}.input_layernorm")
        kv_in = (inputs[past[2 * i]], inputs[past[2 * i + 1]])
        kv_out = (outputs[present[2 * i]], outputs[present[2 * i + 1]])
        hidden = _attention(b, x, layer, i, cfg.num_attention_heads, ts, kv_in, kv_out, lengths, rotary,
                            TYPES[kv_cache])
        x, residual = _norm(b, hidden, residual, layer.post_attention_layernorm,
                            f"model.text_model.layers.{i}.post_attention_layernorm")
        hidden = _mlp(b, x, layer, i)
    normed, _ = _norm(b, hidden, residual, text.norm, "model.text_model.norm")
    start = b.op("Neg", [inputs["logits_to_keep"]])
    kept = b.op("Slice", [normed, start, b.weight("end", np.array([2**62], np.int64)), b.weight("seq_axis", np.array([1], np.int64))])
    b.op("MatMul", [kept, b.weight("lm_head.weight", model.lm_head.weight.detach().T)], name="lm_head",
         outputs=[outputs["logits"]])
    graph = ir.Graph(list(inputs.values()), list(outputs.values()), nodes=b.tape.nodes, initializers=b.initializers,
                     opset_imports={"": OPSET, MS: 1}, name="decoder_model_merged")
    return ir.Model(graph, ir_version=10, producer_name="smoledge")
