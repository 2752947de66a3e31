"""The full SmolVLM2-2.2B architecture with seeded random weights, for speed and size benchmarks offline.

Shapes follow the published ``HuggingFaceTB/SmolVLM2-2.2B-Instruct`` config: the text decoder is
SmolLM2-1.7B (2048 hidden, 24 layers, 32 attention heads and 32 key/value heads -- no GQA -- 8192 FFN,
vocabulary 49280, untied lm_head); the vision tower is SigLIP-so400m (1152 hidden, 27 layers, 16 heads,
4304 FFN, 384-px tiles, patch 14); the connector shuffles by 3, so 81 tokens per tile.  The tokenizer is
SmolLM2's (from the cached SmolLM2 GGUF, the real vocabulary SmolVLM2 extends) with SmolVLM's special
tokens; chat template, image processor (1536-px longest edge, split into 384-px tiles + global image)
as SmolVLM2 has them.  Weights are transformers' own initialisation under a fixed seed: the numbers are
meaningless, the shapes, the FLOPs and the bytes are the 2.2B's.

The build is cached by a recipe hash (``<cache>/models/smolvlm2-2.2b-random``) and written under
``.partial`` then renamed.  ``overrides`` shrink it (layer counts) for tests of the harness itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from smoledge.runtime.cache import cache_path

RECIPE_VERSION = "smolvlm2-2.2b-random-v1"
SEED = 0
TEXT = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
            num_key_value_heads=32, head_dim=64, max_position_embeddings=8192, rope_theta=130000.0,
            rms_norm_eps=1e-5, vocab_size=49280, tie_word_embeddings=False)
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14)
SCALE_FACTOR = 3
IMAGE_SEQ_LEN = (VISION["image_size"] // VISION["patch_size"] // SCALE_FACTOR) ** 2  # 81
IMAGE_PROCESSOR = dict(
    do_resize=True, size={"longest_edge": 4 * VISION["image_size"]},
    max_image_size={"longest_edge": VISION["image_size"]}, do_image_splitting=True, resample=1,  # LANCZOS
    do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, do_pad=True,
)
MARKER = ".smoledge-built"


def default_full_dir() -> Path:
    return cache_path("models") / "smolvlm2-2.2b-random"


def recipe_hash(overrides: dict | None = None) -> str:
    import torch
    import transformers

    payload = json.dumps([RECIPE_VERSION, TEXT, VISION, SCALE_FACTOR, IMAGE_PROCESSOR, SEED, overrides or {},
                          transformers.__version__, torch.__version__], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_tokenizer():
    """SmolLM2's tokenizer with SmolVLM's special tokens and SmolVLM2's chat template."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from smoledge.export.demo_models import SMOLVLM_CHAT_TEMPLATE
    from smoledge.export.realtext_model import SMOLVLM_TOKENS, ensure_smollm2_gguf

    gguf = ensure_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SMOLVLM_TOKENS],
                         special_tokens=True)
    tokenizer.model_max_length = TEXT["max_position_embeddings"]
    tokenizer.chat_template = SMOLVLM_CHAT_TEMPLATE
    if len(tokenizer) > TEXT["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab {TEXT['vocab_size']}")
    return tokenizer


def smolvlm2_config(tokenizer, overrides: dict | None = None):
    from transformers import SmolVLMConfig

    overrides = overrides or {}
    end_of_utterance = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    text = dict(TEXT, **overrides.get("text", {}), model_type="llama", bos_token_id=tokenizer.bos_token_id,
                eos_token_id=end_of_utterance, pad_token_id=tokenizer.pad_token_id)
    return SmolVLMConfig(
        text_config=text, vision_config=dict(VISION, **overrides.get("vision", {})), scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, dtype="float32",
    )


def build_full_model(out_dir: Path | None = None, *, overrides: dict | None = None) -> Path:
    """Write the random SmolVLM2-2.2B (model, tokenizer, processor) to ``out_dir``; cached by recipe."""
    import torch
    from transformers import Idefics3Processor, SmolVLMForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    out_dir = Path(out_dir) if out_dir else default_full_dir()
    recipe = recipe_hash(overrides)
    if (out_dir / MARKER).is_file() and (out_dir / MARKER).read_text().strip() == recipe:
        return out_dir
    tokenizer = build_tokenizer()
    torch.manual_seed(SEED)
    model = SmolVLMForConditionalGeneration(smolvlm2_config(tokenizer, overrides)).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    gen.eos_token_id, gen.do_sample = tokenizer.convert_tokens_to_ids("<end_of_utterance>"), False
    processor = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**IMAGE_PROCESSOR), tokenizer=tokenizer,
                                  image_seq_len=IMAGE_SEQ_LEN, chat_template=tokenizer.chat_template)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size="2GB")
    del model
    processor.save_pretrained(partial)
    (partial / MARKER).write_text(recipe)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir
