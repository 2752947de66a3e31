"""The format-independent part of the manifest, read off the model and its processor."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from smoledge import __version__
from smoledge.export.loader import Checkpoint
from smoledge.runtime.manifest import (SCHEMA_VERSION, CheckpointSampling, Cloud, Generation, Manifest, Memory,
                                       Model, Source, TextModel, TokenizerFile, Tokens, VisionModel)
from smoledge.runtime.preprocess import ImageProcessorConfig
from smoledge.runtime.prompt import ImageTokens
from smoledge.runtime.video import VideoConfig

DEFAULT_MAX_NEW_TOKENS = 256


def image_seq_len(config) -> int:
    vc = config.vision_config
    return ((vc.image_size // vc.patch_size) // config.scale_factor) ** 2


def describe_model(checkpoint: Checkpoint, model, processor, adapter: dict | None = None,
                   cloud: Cloud = Cloud(None, ())) -> Manifest:
    """Every manifest section that does not depend on the artifact format; ``artifacts`` and ``files`` are
    left empty for the targets and the bundle writer (``adapter``: the merged PEFT adapter's record, see
    :mod:`smoledge.export.adapter`; ``cloud``: the cloud targets to record)."""
    config = model.config
    tokenizer = processor.tokenizer
    seq_len = image_seq_len(config)
    image = ImageProcessorConfig.from_hf_preprocessor_config(processor.image_processor.to_dict(), seq_len)
    return Manifest(
        schema_version=SCHEMA_VERSION,
        smoledge_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        source=Source(checkpoint.model_id, checkpoint.revision, checkpoint.file_hashes, adapter),
        model=_model_section(config),
        context_length=int(config.text_config.max_position_embeddings),
        image=image,
        video=_video_section(checkpoint.path, image.tile_size),
        tokens=_tokens_section(tokenizer, config),
        chat_template=_chat_template(processor),
        generation=_generation_section(model, tokenizer, checkpoint.path),
        memory=_memory_section(config),
        cloud=cloud,
        tokenizer=TokenizerFile("tokenizer.json"),
        artifacts={},
        files={},
    )


def _video_section(folder: Path, tile_size: int) -> VideoConfig:
    """SmolVLM2 video settings from the video processor config transformers would load, else SmolVLM2's
    defaults.  Video requests use transformers' SmolVLM video chat template, as ``SmolVLMProcessor`` does."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    return VideoConfig.from_hf(hf_video_processor_config(folder), tile_size=tile_size,
                               chat_template=DEFAULT_CHAT_TEMPLATE)


def hf_video_processor_config(folder: Path) -> dict | None:
    """transformers' order: processor_config.json's "video_processor", video_preprocessor_config.json, then a
    preprocessor_config.json that carries SmolVLM2's "video_sampling"; None when there is none."""
    nested = _read_json(folder / "processor_config.json").get("video_processor")
    if isinstance(nested, dict):
        return nested
    if (folder / "video_preprocessor_config.json").is_file():
        return _read_json(folder / "video_preprocessor_config.json")
    legacy = _read_json(folder / "preprocessor_config.json")
    return legacy if "video_sampling" in legacy else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        from smoledge.errors import ExportError

        raise ExportError(f"cannot read {path.name}: {err}", hint="fix or remove the file") from None
    return data if isinstance(data, dict) else {}


def _model_section(config) -> Model:
    tc, vc = config.text_config, config.vision_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return Model(
        model_type=config.model_type,
        architecture=type(config).__name__.removesuffix("Config") + "ForConditionalGeneration",
        scale_factor=int(config.scale_factor), image_seq_len=image_seq_len(config),
        text=TextModel(model_type=tc.model_type, hidden_size=tc.hidden_size, num_hidden_layers=tc.num_hidden_layers,
                       num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
                       head_dim=head_dim, intermediate_size=tc.intermediate_size, vocab_size=tc.vocab_size),
        vision=VisionModel(hidden_size=vc.hidden_size, num_hidden_layers=vc.num_hidden_layers,
                           num_attention_heads=vc.num_attention_heads, intermediate_size=vc.intermediate_size,
                           image_size=vc.image_size, patch_size=vc.patch_size),
    )


def _tokens_section(tokenizer, config) -> Tokens:
    image = ImageTokens()
    image_id = tokenizer.convert_tokens_to_ids(image.image)
    if image_id != config.image_token_id:
        from smoledge.errors import ExportError

        raise ExportError(f"the tokenizer's {image.image} id ({image_id}) differs from the model's "
                          f"image_token_id ({config.image_token_id})", hint="the checkpoint's tokenizer does not "
                          "belong to its weights")
    return Tokens(**image.to_dict(), image_token_id=image_id,
                  bos_token=tokenizer.bos_token, bos_token_id=tokenizer.bos_token_id,
                  eos_token=tokenizer.eos_token, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return sorted(set(int(i) for i in ids))


def _generation_section(model, tokenizer, folder: Path) -> Generation:
    return Generation(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, eos_token_ids=tuple(_eos_ids(model, tokenizer)),
                      temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                      checkpoint=checkpoint_sampling(_read_json(folder / "generation_config.json")))


def checkpoint_sampling(config: dict) -> CheckpointSampling | None:
    """The sampling values a generation_config.json sets, as vLLM reads them: the values present, not
    ``do_sample`` (transformers writes ``do_sample: false`` into configs derived from a model config)."""
    kinds = {"temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}
    values = {key: kind(config[key]) for key, kind in kinds.items()
              if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool)}
    return CheckpointSampling(**values) if values else None


def _chat_template(processor) -> str:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    if not template:
        from smoledge.errors import ExportError

        raise ExportError("the checkpoint has no chat template", hint="add chat_template.jinja to the checkpoint")
    return template


def _memory_section(config) -> Memory:
    """Figures the router needs; weight_bytes is filled in from the artifacts once they are written."""
    tc, vc = config.text_config, config.vision_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    patches = (vc.image_size // vc.patch_size) ** 2
    kv_bytes_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * 4  # fp32 K and V
    # Peak activations of one tile in the vision encoder: hidden states, the MLP, one attention matrix.
    vision_bytes = 4 * patches * (4 * vc.hidden_size + vc.intermediate_size) + 4 * vc.num_attention_heads * patches**2
    # One decode step besides the KV cache: the logits, the MLP's intermediate and a few hidden-state buffers.
    activation_bytes = 4 * (tc.vocab_size + tc.intermediate_size + 4 * tc.hidden_size)
    return Memory(weight_bytes=0, kv_bytes_per_token=kv_bytes_per_token, vision_bytes_per_tile=vision_bytes,
                  activation_bytes=activation_bytes,
                  notes="weight_bytes: the largest format's weights; KV cache kept in float32; activation_bytes: "
                  "one decode step's decoder activations besides the KV cache")
