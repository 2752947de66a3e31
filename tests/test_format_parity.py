"""Parity with transformers eager, over the format registry: every registered format is checked at the
level it declares (``FormatSpec.parity``), and a format whose declared coverage is missing fails here.

* ``runtime``: the fp32 export of the tiny random model, run by the format's own backend, against
  transformers eager: logits within 1e-4 relative (to their largest magnitude) at every teacher-forced step,
  greedy tokens identical, free-running stream identical; text only, one image, two images, several sizes.
  A new format with runtime parity is exported and run here by name, with no test code of its own.
* ``wrapper``: the platform cannot predict (Core ML on Linux), so the traced wrapper is compared with eager
  and the converted program is evaluated by the reference evaluator; those tests are named below.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from conftest import synthetic_image
from eager_reference import expected_stream, hf_reference, relative_errors, teacher_forced
from smoledge.runtime import ChatRequest, Message, SamplingConfig, load
from smoledge.runtime.formats import FORMATS

STEPS = 32
REL_TOL = 1e-4
CASES = {
    "text-only": [],
    "one-image": [(100, 70)],
    "two-images": [(60, 60), (200, 90)],
    "tiny-image": [(7, 5)],
    "panorama": [(400, 40)],
    "tall": [(50, 260)],
}
RUNTIME = [name for name, spec in FORMATS.items() if spec.parity == "runtime"]
# Formats that declare wrapper-level parity -> the tests (module, function) that give it.
WRAPPER_COVERAGE = {
    "coreml": (("test_coreml_wrapper", "test_tiny_decoder_wrapper_matches_eager"),
               ("test_coreml_backend", "test_backend_code_over_the_programs_matches_eager")),
}


@pytest.fixture(scope="module")
def pipes(fp32_bundle_with):
    loaded = {}

    def get(fmt: str):
        if fmt not in loaded:
            loaded[fmt] = load(fp32_bundle_with(fmt), backend=fmt)
        return loaded[fmt]

    return get


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", RUNTIME)
def test_fp32_export_matches_transformers_eager(fmt, case, pipes, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(CASES[case])]
    text = "What is in this image?"
    inputs, ref_tokens, ref_logits = hf_reference(model, processor, images, text, STEPS)
    prepared, ours = teacher_forced(pipes(fmt), images, text, ref_tokens)
    np.testing.assert_array_equal(prepared.input_ids, inputs["input_ids"].numpy())
    errors = relative_errors(ours, ref_logits)
    assert max(errors) < REL_TOL, f"{fmt} {case}: logits differ by up to {max(errors):.2e} (relative)"
    assert [int(np.argmax(logits)) for logits in ours] == ref_tokens
    assert len(set(ref_tokens)) > 3, "the tiny model collapsed onto a few tokens; the test would prove little"


@pytest.mark.parametrize("fmt", RUNTIME)
def test_free_running_stream_matches_eager(fmt, pipes, tiny_model_and_processor):
    """The full pipeline (preprocess -> stream) reproduces HF's greedy tokens without teacher forcing."""
    model, processor = tiny_model_and_processor
    images = [synthetic_image(120, 80, seed=3)]
    _, ref_tokens, _ = hf_reference(model, processor, images, "Describe the picture.", STEPS)
    pipe = pipes(fmt)
    request = ChatRequest((Message.user("Describe the picture.", images),), SamplingConfig(max_new_tokens=STEPS))
    assert [chunk.token_id for chunk in pipe.stream(request)] == expected_stream(ref_tokens, pipe.eos_ids)


def test_every_registered_format_has_the_coverage_it_declares():
    for name, spec in FORMATS.items():
        assert spec.parity in ("runtime", "wrapper"), f"{name}: unknown parity level {spec.parity!r}"
        if spec.parity == "runtime":
            assert name in RUNTIME  # parametrized above: exported and run against eager
            continue
        coverage = WRAPPER_COVERAGE.get(name)
        assert coverage, f"{name} declares wrapper parity but no test gives it (add it to WRAPPER_COVERAGE)"
        for module, function in coverage:
            test = getattr(importlib.import_module(module), function, None)
            assert callable(test), f"{name}: {module}.{function} is missing"


def test_the_registry_and_the_manifest_schema_name_the_same_formats():
    from smoledge.runtime.manifest import ARTIFACT_TYPES

    assert set(FORMATS) == set(ARTIFACT_TYPES)
    for name, spec in FORMATS.items():
        assert spec.artifact_type is ARTIFACT_TYPES[name] and spec.name == name
