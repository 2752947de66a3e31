"""Multi-image and interleaved prompts end to end: the fp32 tiny bundle against transformers' processor
(token ids, pixels) and eager model (logits, 1e-4 relative, teacher-forced), and through ``smoledge run``.

* images between text turns and several images in one turn: the reference is the tiny checkpoint's own
  processor (``Idefics3Processor`` with the PIL image processor) called as transformers documents it;
* an image and a video in one request: transformers' processors cannot take both in one call (both write
  ``pixel_values``), so the reference is assembled from transformers' own pieces - ``apply_chat_template``
  (the SmolVLM video template), ``replace_image_token`` / ``replace_video_token`` and
  ``get_text_with_replacements`` - with the vision input in prompt order (see test_video_parity.py for the
  video processor harness).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import synthetic_image
from smoledge import cli
from smoledge.runtime import ChatRequest, Message, SamplingConfig, load
from smoledge.runtime.types import ImagePart, TextPart, VideoPart
from test_video import make_clip
from test_video_parity import STEPS, assert_matches_eager, hf_load_video, reference_processor

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def pipe(tiny_fp32_bundle):
    return load(tiny_fp32_bundle)


def _hf_content(parts) -> list[dict]:
    out = []
    for p in parts:
        if isinstance(p, TextPart):
            out.append({"type": "text", "text": p.text})
        else:
            out.append({"type": "image" if isinstance(p, ImagePart) else "video"})
    return out


def _check_against_processor(pipe, processor, model, messages) -> None:
    images = [p.image for m in messages for p in m.content if isinstance(p, ImagePart)]
    hf = [{"role": m.role, "content": _hf_content(m.content)} for m in messages]
    prompt = processor.apply_chat_template(hf, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[images], return_tensors="pt")
    prepared = pipe.prepare(ChatRequest(tuple(messages), SamplingConfig(max_new_tokens=STEPS)))
    np.testing.assert_array_equal(prepared.input_ids, inputs["input_ids"].numpy())
    np.testing.assert_allclose(prepared.images.pixel_values, inputs["pixel_values"][0].numpy(), rtol=0, atol=1e-6)
    assert_matches_eager(pipe, prepared, model, inputs)


def test_images_between_text_turns(pipe, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    a, b, c = synthetic_image(100, 70, seed=1), synthetic_image(200, 90, seed=2), synthetic_image(30, 30, seed=3)
    messages = [
        Message("user", (TextPart("Look at this:"), ImagePart(a), TextPart(" what is it?"))),
        Message("assistant", (TextPart("A gradient with noise."),)),
        Message("user", (ImagePart(b), TextPart("Compare it with"), ImagePart(c), TextPart("please."))),
    ]
    _check_against_processor(pipe, processor, model, messages)


def test_several_images_in_one_turn(pipe, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate([(60, 60), (260, 50), (7, 5), (90, 140)])]
    _check_against_processor(pipe, processor, model, [Message.user("Which two are alike?", images)])


def test_video_then_image_in_one_request(pipe, tiny_model_and_processor, tmp_path):
    model, processor = tiny_model_and_processor
    ref = reference_processor(processor)
    clip, image = make_clip(tmp_path / "c.mp4", 30, 10), synthetic_image(120, 80, seed=5)
    messages = [Message("user", (VideoPart(clip), TextPart("and this picture:"), ImagePart(image),
                                 TextPart("Same scene?")))]
    prompt = ref.apply_chat_template([{"role": "user", "content": _hf_content(messages[0].content)}],
                                     add_generation_prompt=True)
    frames, meta = hf_load_video(str(clip), backend="pyav",
                                 sample_indices_fn=lambda metadata, **kw: np.arange(metadata.total_num_frames))
    meta.frames_indices = None
    vp = ref.video_processor
    video_in = vp([frames], video_metadata=[meta], do_sample_frames=True, num_frames=vp.num_frames, fps=vp.fps,
                  return_metadata=True, return_tensors="pt")
    image_in = ref.image_processor([[image]], return_row_col_info=True, return_tensors="pt")
    text, _ = ref.get_text_with_replacements([prompt], [ref.replace_image_token(image_in, 0)],
                                             [ref.replace_video_token(video_in, 0)])
    ids = ref.tokenizer(text[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    pixels = torch.cat([video_in["pixel_values"][0], image_in["pixel_values"][0]])  # prompt order: video, image

    pipe.set_video_max_frames(64)
    prepared = pipe.prepare(ChatRequest(tuple(messages), SamplingConfig(max_new_tokens=STEPS)))
    np.testing.assert_array_equal(prepared.input_ids, ids.numpy())
    np.testing.assert_allclose(prepared.images.pixel_values, pixels.numpy(), rtol=0, atol=1e-6)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels[None],
              "pixel_attention_mask": torch.ones(1, *pixels.shape[:1], *pixels.shape[2:], dtype=torch.bool)}
    assert_matches_eager(pipe, prepared, model, inputs)


def test_run_takes_repeated_images(tiny_fp32_bundle, pipe, tmp_path, capsys):
    paths, images = [], [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate([(400, 40), (40, 300)])]
    for i, image in enumerate(images):  # narrow images: 5 tiles each, within the auto profile's 17
        paths += ["--image", str(tmp_path / f"{i}.png")]
        image.save(paths[-1])
    tiles = pipe.measure(ChatRequest((Message.user("Compare them.", paths[1::2]),))).image_tiles
    rc = cli.main(["run", str(tiny_fp32_bundle), *paths, "--prompt", "Compare them.", "--max-new-tokens", "4",
                   "--stats", "--temperature", "0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.strip() and tiles == 10 and f" {tiles} tiles," in out.err
