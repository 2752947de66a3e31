"""A synthetic clip through the runtime, against transformers' SmolVLM video processor and eager model.

The reference (``hf_video_inputs``) is transformers 5.24's own SmolVLM video path, run without torchvision:

* decoding: ``transformers.video_utils.load_video(backend="pyav")`` (transformers' PyAV reader; its default
  decoder, torchcodec, is not installed here);
* frame choice, resize geometry, rescale/normalize, padding, and the prompt (intro, ``Frame from MM:SS:``
  lines, outro, frame count in words via num2words): ``SmolVLMVideoProcessor`` and ``SmolVLMProcessor``
  called as ``apply_chat_template`` calls them (``do_sample_frames=True``, ``num_frames``/``fps`` from the
  config) on the decoded clip and its metadata;
* what transformers would hand to torchvision - the resize kernel, the grey->RGB check and the normalize -
  is done by ``_PilKernels``: Pillow's LANCZOS on uint8 frames (what transformers' PIL image processors and
  SmolVLM's training used; transformers itself warns that its tensor LANCZOS does not match it exactly) and
  ``(x - mean) / std`` in float32 torch.  ``SmolVLMProcessor``'s class check on the video processor is
  skipped, because ``transformers.BaseVideoProcessor`` is a torchvision-gated placeholder here.

Limits: the torchvision kernel itself is not compared; decoding is PyAV on both sides.

Tolerances: prompt token ids identical; frame pixels identical (compared at atol 1e-6); logits of the fp32
bundle within 1e-4 of the eager model (relative to their scale) at every teacher-forced step.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from smoledge.runtime import ChatRequest, Message, SamplingConfig, load
from smoledge.runtime.types import TextPart, VideoPart
from smoledge.runtime.video import VideoConfig
from test_video import make_clip

torch = pytest.importorskip("torch")
pytest.importorskip("num2words")
from transformers.video_processing_utils import BaseVideoProcessor  # noqa: E402
from transformers.video_utils import load_video as hf_load_video  # noqa: E402

hf_processing = importlib.import_module("transformers.models.smolvlm.processing_smolvlm")
hf_video = importlib.import_module("transformers.models.smolvlm.video_processing_smolvlm")

STEPS = 6
REL_TOL = 1e-4
TILE = 54  # the tiny model's vision input
# SmolVLM2's video_sampling for a model whose tile is TILE; the tiny checkpoint has no video config, so its
# bundle carries exactly these defaults.
HF_VIDEO_CONFIG = {"video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": TILE}},
                   "max_image_size": {"longest_edge": TILE}}


class _PilKernels(BaseVideoProcessor):
    """The torchvision primitives of transformers' video backend, done without torchvision (see module doc)."""

    def resize(self, video, size, resample=None, antialias=True, **kwargs):
        from PIL import Image

        flat = video.reshape(-1, *video.shape[-3:])
        out = [np.asarray(Image.fromarray(f.permute(1, 2, 0).numpy()).resize(
            (size.width, size.height), resample=Image.Resampling(int(resample)))) for f in flat]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).reshape(*video.shape[:-2], size.height, size.width)

    def convert_to_rgb(self, video):
        assert video.shape[-3] == 3  # PyAV decodes to rgb24
        return video

    def normalize(self, image, mean, std, inplace=False, **kwargs):
        mean = torch.as_tensor(mean, dtype=image.dtype)[:, None, None]
        std = torch.as_tensor(std, dtype=image.dtype)[:, None, None]
        return (image - mean) / std


class RefVideoProcessor(hf_video.SmolVLMVideoProcessor, _PilKernels):
    """SmolVLMVideoProcessor whose ``super().resize`` lands on _PilKernels (MRO: SmolVLM -> _PilKernels -> Base)."""


class RefProcessor(hf_processing.SmolVLMProcessor):
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":  # BaseVideoProcessor is a torchvision-gated placeholder here
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


def reference_processor(tiny_processor, video_config: dict = HF_VIDEO_CONFIG):
    import copy

    return RefProcessor(image_processor=tiny_processor.image_processor, tokenizer=tiny_processor.tokenizer,
                        video_processor=RefVideoProcessor(**copy.deepcopy(video_config)),
                        image_seq_len=tiny_processor.image_seq_len)


def hf_messages(text: str):
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]


def hf_video_inputs(processor, clip, messages, *, num_frames: int | None = None):
    """transformers' inputs for a conversation with one video, as apply_chat_template(tokenize=True) builds them."""
    video, meta = hf_load_video(str(clip), backend="pyav",
                                sample_indices_fn=lambda metadata, **kw: np.arange(metadata.total_num_frames))
    meta.frames_indices = None
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    vp = processor.video_processor
    return processor(text=prompt, videos=[video], video_metadata=[meta], do_sample_frames=True,
                     num_frames=num_frames or vp.num_frames, fps=vp.fps, return_tensors="pt",
                     add_special_tokens=not prompt.startswith(processor.tokenizer.bos_token))


def assert_matches_eager(pipe, prepared, model, inputs, steps: int = STEPS) -> None:
    """The bundle's logits follow the eager model's, teacher-forced on its greedy tokens."""
    keys = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    feed = {k: inputs[k] for k in keys if k in inputs}
    with torch.no_grad():
        out = model.generate(**feed, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None)
    ref_tokens = out.sequences[0, feed["input_ids"].shape[1]:].tolist()
    backend = pipe.backend
    cache = backend.new_cache(prepared.input_ids.shape[1] + steps)
    logits = backend.step(pipe.prompt_embeds(prepared), cache)
    for step, ref in enumerate(out.logits):
        ref = ref[0].numpy()
        err = np.abs(logits - ref).max() / np.abs(ref).max()
        assert err < REL_TOL, f"step {step}: logits differ by {err:.2e} (relative)"
        logits = backend.step(backend.embed(np.array([[ref_tokens[step]]])), cache)


@pytest.fixture(scope="module")
def pipe(tiny_fp32_bundle):
    return load(tiny_fp32_bundle)


@pytest.fixture(scope="module")
def ref_processor(tiny_model_and_processor):
    return reference_processor(tiny_model_and_processor[1])


def _request(clip, text: str, max_new_tokens: int = STEPS) -> ChatRequest:
    return ChatRequest((Message("user", (VideoPart(clip), TextPart(text))),),
                       SamplingConfig(max_new_tokens=max_new_tokens))


def test_bundle_video_section_is_the_reference_config(pipe):
    assert pipe.video_config == VideoConfig.from_hf(HF_VIDEO_CONFIG, tile_size=TILE,
                                                    chat_template=hf_processing.DEFAULT_CHAT_TEMPLATE)


CLIPS = {  # name: (frames, fps, width, height, max_frames override)
    "short-landscape": (35, 10, 80, 48, None),  # 3.5 s: round(3.5) = 4 frames, no skip
    "long-portrait": (140, 2, 32, 48, 8),  # 70 s: skips the first/last second, MM:SS past one minute
}


@pytest.mark.parametrize("name", list(CLIPS))
def test_clip_matches_transformers_video_processor(name, pipe, ref_processor, tiny_model_and_processor, tmp_path):
    frames, fps, width, height, max_frames = CLIPS[name]
    clip = make_clip(tmp_path / f"{name}.mp4", frames, fps, width, height, seed=len(name))
    text = "What happens in this video?"
    ref = hf_video_inputs(ref_processor, clip, hf_messages(text), num_frames=max_frames)

    pipe.set_video_max_frames(max_frames or 64)
    request = _request(clip, text)
    prepared = pipe.prepare(request)
    np.testing.assert_array_equal(prepared.input_ids, ref["input_ids"].numpy())
    ref_pixels = ref["pixel_values"][0].numpy()
    np.testing.assert_allclose(prepared.images.pixel_values, ref_pixels, rtol=0, atol=1e-6)
    assert prepared.images.pixel_attention_mask.all() and ref["pixel_attention_mask"].numpy().all()
    shape = pipe.measure(request)
    assert (shape.video_frames, shape.prompt_tokens) == (len(ref_pixels), ref["input_ids"].shape[1])
    assert_matches_eager(pipe, prepared, tiny_model_and_processor[0], ref)


def test_stream_answers_a_video_and_counts_frames(pipe, tmp_path):
    clip = make_clip(tmp_path / "c.mp4", 25, 5)
    pipe.set_video_max_frames(64)
    chunks = list(pipe.stream(_request(clip, "Describe it.", max_new_tokens=4)))
    assert chunks and pipe.last_stats.image_tiles == 5  # 5 s at 1 fps
