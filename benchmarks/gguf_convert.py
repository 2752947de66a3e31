"""SmolVLM (HF folder) -> GGUF for llama.cpp: the text decoder, its mmproj, and llama.cpp quantization.

Written with the ``gguf`` package's writer (tensor names from its ``TensorNameMap``, so they follow
llama.cpp's own converter): the text decoder as a ``llama`` model (q/k rows permuted to llama.cpp's
rotary layout, tokenizer taken from ``tokenizer.json``, vocabulary padded to the embedding rows), and
the vision tower + connector as an ``idefics3`` mmproj (embeddings float32, linear weights Q8_0 where
the row length allows, else float16, as ``convert_hf_to_gguf.py --outtype q8_0`` does).  The float GGUF
is then quantized by llama.cpp itself (``llama_model_quantize``), so Q4_0 / Q4_K_M are exactly what
``llama-quantize`` makes.  Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

TOKENIZER_PRE = "smollm"  # SmolLM2's pre-tokenizer, as in the SmolLM2 GGUF and llama.cpp's converter
QUANT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "F16": 1}  # llama_ftype values


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where.update({name: path for name in f.keys()})
    return where


def _load(path: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).float().numpy()


def _rotary_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved layout (as ``convert_hf_to_gguf`` does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _shape(path: Path, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return tuple(f.get_slice(name).get_shape())


def _text_items(model_dir: Path, text: dict, tied: bool) -> list[tuple[str, str, Path, str]]:
    """(gguf name, hf name, file, storage) for the text decoder: matrices F16, norms F32."""
    import gguf

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, text["num_hidden_layers"])
    items = []
    for hf_name, path in sorted(_tensor_files(model_dir).items()):
        if hf_name == "lm_head.weight":
            if not tied:
                items.append(("output.weight", hf_name, path, "F16"))
            continue
        if not hf_name.startswith("model.text_model."):
            continue
        mapped = names.get_name(hf_name.replace("text_model.", ""), try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"no GGUF name for text tensor {hf_name}")
        items.append((mapped, hf_name, path, "F16" if len(_shape(path, hf_name)) > 1 else "F32"))
    return items


def _text_array(gguf_name: str, array: np.ndarray, text: dict) -> np.ndarray:
    if gguf_name.endswith("attn_q.weight"):
        return _rotary_permute(array, text["num_attention_heads"])
    if gguf_name.endswith("attn_k.weight"):
        return _rotary_permute(array, text.get("num_key_value_heads", text["num_attention_heads"]))
    return array


def _text_metadata(writer, config: dict) -> None:
    import gguf

    text = config["text_config"]
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    rope = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta", 10000.0))
    writer.add_context_length(text.get("max_position_embeddings", 8192))
    writer.add_embedding_length(text["hidden_size"])
    writer.add_block_count(text["num_hidden_layers"])
    writer.add_feed_forward_length(text["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(text.get("num_key_value_heads", heads))
    writer.add_layer_norm_rms_eps(text.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(text["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def _tokenizer_metadata(writer, model_dir: Path, vocab_size: int, text: dict) -> None:
    import gguf

    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for piece, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = piece, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = text.get(key)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            add(int(value))


def write_text_gguf(model_dir: Path, out: Path) -> Path:
    """The SmolVLM text decoder as an F16 llama GGUF (norms float32)."""
    config = json.loads((model_dir / "config.json").read_text())
    text = config["text_config"]
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))

    def metadata(writer):
        _text_metadata(writer, config)
        _tokenizer_metadata(writer, model_dir, text["vocab_size"], text)

    def load(gguf_name: str, hf_name: str, path: Path) -> np.ndarray:
        return _text_array(gguf_name, _load(path, hf_name), text)

    return _write(out, "llama", metadata, _text_items(model_dir, text, tied), load)


def write_mmproj_gguf(model_dir: Path, out: Path, *, preproc_image_size: int | None = None) -> Path:
    """The vision tower + connector as an idefics3 mmproj.  ``preproc_image_size`` (the processor's
    longest edge) makes llama.cpp split images into tiles as SmolVLM does; without it, one tile."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.MMPROJ, config["vision_config"]["num_hidden_layers"])
    items = []
    for hf_name, path in sorted(_tensor_files(model_dir).items()):
        if "vision_model." in hf_name or "model.connector." in hf_name:
            mapped = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if mapped is None:
                raise ValueError(f"no GGUF name for vision tensor {hf_name}")
            items.append((mapped, hf_name, path, _mmproj_storage(hf_name, _shape(path, hf_name))))

    def metadata(writer):
        _mmproj_metadata(writer, config, preproc_image_size)

    return _write(out, "clip", metadata, items, lambda _, hf_name, path: _load(path, hf_name))


def _mmproj_storage(hf_name: str, shape: tuple[int, ...]) -> str:
    if ".embeddings." in hf_name or len(shape) == 1:
        return "F32"
    return "Q8_0" if len(shape) == 2 and shape[-1] % 32 == 0 else "F16"


def _mmproj_metadata(writer, config: dict, preproc_image_size: int | None) -> None:
    import gguf

    vision = config["vision_config"]
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
    writer.add_vision_image_size(vision["image_size"])
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_block_count(vision["num_hidden_layers"])
    writer.add_vision_head_count(vision["num_attention_heads"])
    writer.add_vision_projection_dim(config["text_config"]["hidden_size"])
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-6))
    writer.add_vision_projector_scale_factor(config.get("scale_factor", 2))
    writer.add_vision_use_gelu(True)
    if preproc_image_size:
        writer.add_vision_preproc_image_size(preproc_image_size)


def _stored(array: np.ndarray, storage: str) -> np.ndarray:
    import gguf

    if storage == "Q8_0":
        return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return array.astype(np.float16 if storage == "F16" else np.float32)


def _info(shape: tuple[int, ...], storage: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as the writer wants it, numpy dtype, bytes) without loading the tensor."""
    import gguf

    count = int(np.prod(shape))
    if storage == "Q8_0":
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
        byte_shape = (*shape[:-1], shape[-1] // block * type_size)
        return byte_shape, np.dtype(np.uint8), count // block * type_size
    dtype = np.dtype(np.float16 if storage == "F16" else np.float32)
    return shape, dtype, count * dtype.itemsize


def _write(out: Path, arch: str, metadata, items: list, load) -> Path:
    """Write ``out`` streaming: tensor infos from shapes, then one tensor in memory at a time."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        metadata(writer)
        for gguf_name, hf_name, path, storage in items:
            shape, dtype, nbytes = _info(_shape(path, hf_name), storage)
            raw = gguf.GGMLQuantizationType[storage]
            writer.add_tensor_info(gguf_name, shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, hf_name, path, storage in items:
            writer.write_tensor_data(_stored(load(gguf_name, hf_name, path), storage))
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def quantize_gguf(src: Path, dst: Path, qtype: str, threads: int) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``), re-quantizing allowed."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = threads
    params.allow_requantize = True
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            raise RuntimeError(f"llama_model_quantize({src.name} -> {qtype}) returned {code}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def gguf_bits_per_weight(path: Path, *, matrices_only: bool = False) -> float:
    """Bits per weight over the file's tensors (all of them: embeddings and output included)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    bits = weights = 0
    for tensor in reader.tensors:
        if matrices_only and len(tensor.shape) < 2:
            continue
        bits += int(tensor.n_bytes) * 8
        weights += int(tensor.n_elements)
    return round(bits / weights, 3) if weights else 0.0
