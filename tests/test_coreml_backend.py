"""The Core ML runtime backend.

On Linux: ``--backend coreml`` refuses at load in one line naming macOS 15, and the backend's own code
(prompt embedding, image splicing, position ids, masks, KV-state bookkeeping, capacity checks) runs
through :class:`~smoledge.runtime.pipeline.Pipeline` against the reference evaluator of the bundle's
packages, compared with transformers eager: logits within 3e-2 of their scale at every teacher-forced
step (fp16 programs, one image), top-1 identical wherever the eager margin exceeds twice the error.

On macOS 15+ (``pytest -m macos``): the same comparisons with Apple's Core ML doing the predictions.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import synthetic_image
from eager_reference import hf_reference
from mil_eval import MilProgram, single_threaded
from smoledge.errors import BackendUnavailableError, InputError, PromptTooLongError
from smoledge.runtime import ChatRequest, Message, SamplingConfig
from smoledge.runtime.backends.coreml import MODELS, CoreMLBackend, package_paths
from smoledge.runtime.bundle import open_bundle
from smoledge.runtime.pipeline import Pipeline
from test_coreml_export import cli_int4_bundle, coreml_bundle

STEPS, LOGIT_TOL = 16, 3e-2
on_mac = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS 15+")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def fp16_bundle(tiny_model_dir, tmp_path_factory):
    return coreml_bundle(tmp_path_factory, tiny_model_dir, "tiny-coreml-fp32", "fp32", context=256)


@pytest.fixture(scope="module")
def int4_bundle(tiny_model_dir, tiny_int4_bundle, tmp_path_factory):
    return cli_int4_bundle(tiny_model_dir, tiny_int4_bundle, tmp_path_factory)


def reference_pipeline(path) -> Pipeline:
    """The bundle's Core ML backend code, predicting with the reference evaluator instead of Core ML."""
    bundle = open_bundle(path)
    programs = {name: MilProgram(p) for name, p in package_paths(bundle).items()}
    return Pipeline(bundle, CoreMLBackend(bundle, programs))


def _request(images, steps: int = STEPS) -> ChatRequest:
    return ChatRequest((Message.user("What is in this image?", images),), SamplingConfig(max_new_tokens=steps))


def _eager(model, processor, images, steps: int = STEPS):
    return hf_reference(model, processor, images, "What is in this image?", steps)


def check_against_eager(pipe: Pipeline, model, processor, images) -> None:
    inputs, tokens, ref_logits = _eager(model, processor, images)
    prepared = pipe.prepare(_request(images))
    np.testing.assert_array_equal(prepared.input_ids, inputs["input_ids"].numpy())
    backend = pipe.backend
    cache = backend.new_cache(prepared.input_ids.shape[1] + STEPS)
    logits = backend.step(pipe.prompt_embeds(prepared), cache)
    for step, ref in enumerate(ref_logits):
        err = np.abs(logits - ref).max()
        assert err / np.abs(ref).max() < LOGIT_TOL, f"step {step}: logits differ by {err:.3f}"
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 2 * err:
            assert int(np.argmax(logits)) == tokens[step], f"step {step}: top-1 differs"
        logits = backend.step(backend.embed(np.array([[tokens[step]]])), cache)
    assert cache.length == prepared.input_ids.shape[1] + STEPS


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off Apple platforms")
def test_load_refuses_off_macos_in_one_line(fp16_bundle):
    with pytest.raises(BackendUnavailableError) as info:
        Pipeline.load(fp16_bundle, backend="coreml")
    message = str(info.value)
    assert "macOS 15" in message and "--backend onnx" in message and "\n" not in message


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off Apple platforms")
def test_cli_refusal_is_one_line(fp16_bundle):
    from conftest import run_cli

    res = run_cli("run", str(fp16_bundle), "--backend", "coreml", "--prompt", "hi")
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0 and "macOS 15" in res.stderr, res.stderr


def test_old_macos_is_refused(monkeypatch):
    from smoledge.runtime.backends import coreml

    monkeypatch.setattr(coreml.sys, "platform", "darwin")
    monkeypatch.setattr(coreml.platform, "mac_ver", lambda: ("14.6.1", ("", "", ""), "arm64"))
    with pytest.raises(BackendUnavailableError, match="macOS 14.6.1"):
        coreml.check_platform()
    monkeypatch.setattr(coreml.platform, "mac_ver", lambda: ("15.1", ("", "", ""), "arm64"))
    coreml.check_platform()


def test_backend_code_over_the_programs_matches_eager(fp16_bundle, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    check_against_eager(reference_pipeline(fp16_bundle), model, processor, [synthetic_image(100, 70)])


def test_int4_stream_matches_torch_with_the_programs_weights(int4_bundle, tiny_model_and_processor):
    """Free-running greedy text through Pipeline.stream equals the torch wrappers carrying the int4
    programs' own weights."""
    from smoledge.export.coreml_graphs import CoreMLEmbedTokens, StatefulDecoder
    from test_coreml_numerics import with_program_weights
    from test_coreml_wrapper import run_wrapper

    model, _ = tiny_model_and_processor
    pipe = reference_pipeline(int4_bundle)
    request = ChatRequest((Message.user("Describe the picture."),), SamplingConfig(max_new_tokens=STEPS))
    got = [chunk.token_id for chunk in pipe.stream(request)]
    programs = pipe.backend.models
    capacity = pipe.backend.capacity
    decoder = with_program_weights(StatefulDecoder(model, capacity, torch.float16).eval(), programs["decoder"])
    embed = with_program_weights(CoreMLEmbedTokens(model).eval(), programs["embed_tokens"])
    ids = torch.from_numpy(pipe.prepare(request).input_ids)
    expected = []
    for logits in run_wrapper(decoder, embed, ids, STEPS):
        expected.append(int(np.argmax(logits)))
        if expected[-1] in pipe.eos_ids:
            break
    assert got == expected and len(got) > 3


def test_capacity_and_padded_tiles_are_refused(fp16_bundle):
    pipe = reference_pipeline(fp16_bundle)
    backend, capacity = pipe.backend, pipe.backend.capacity
    with pytest.raises(PromptTooLongError, match=f"KV capacity of {capacity}"):
        backend.new_cache(capacity + 1)
    side = pipe.image_config.tile_size
    mask = np.ones((1, side, side), dtype=bool)
    mask[:, side // 2:] = False
    with pytest.raises(InputError, match="full tiles"):
        backend.encode_images(np.zeros((1, 3, side, side), np.float32), mask)
    hidden = pipe.manifest.model.text.hidden_size
    cache = backend.new_cache(capacity)
    backend.step(np.zeros((1, capacity - 4, hidden), np.float32), cache)
    with pytest.raises(PromptTooLongError):
        backend.step(np.zeros((1, 5, hidden), np.float32), cache)


def test_every_model_of_the_manifest_is_loaded(fp16_bundle):
    pipe = reference_pipeline(fp16_bundle)
    assert set(pipe.backend.models) == set(MODELS)


# --------------------------------------------------------------------------- macOS only


@pytest.mark.macos
@on_mac
def test_core_ml_matches_eager_on_macos(fp16_bundle, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    pipe = Pipeline.load(fp16_bundle, backend="coreml", compute_units="CPU_ONLY")
    check_against_eager(pipe, model, processor, [synthetic_image(100, 70)])


@pytest.mark.macos
@on_mac
def test_core_ml_int4_agrees_with_the_reference_on_macos(int4_bundle):
    """Apple's kernels against the reference evaluator on the same int4 packages: text generation
    teacher-forced on the reference's tokens, logits within 3e-2 of their scale."""
    ours = Pipeline.load(int4_bundle, backend="coreml")
    ref = reference_pipeline(int4_bundle)
    request = ChatRequest((Message.user("Describe the picture.", [synthetic_image(90, 60)]),),
                          SamplingConfig(max_new_tokens=STEPS))
    prepared = ref.prepare(request)
    caches = [p.backend.new_cache(prepared.input_ids.shape[1] + STEPS) for p in (ours, ref)]
    logits = [p.backend.step(p.prompt_embeds(prepared), c) for p, c in zip((ours, ref), caches)]
    for step in range(STEPS):
        err = np.abs(logits[0] - logits[1]).max() / np.abs(logits[1]).max()
        assert err < LOGIT_TOL, f"step {step}: Core ML and the reference differ by {err:.2e}"
        token = np.array([[int(np.argmax(logits[1]))]])
        logits = [p.backend.step(p.backend.embed(token), c) for p, c in zip((ours, ref), caches)]
