"""The Core ML INT4 bundle of the real-text model (SmolLM2-135M-Instruct decoder), on Linux.

Exported through the pipeline with a 256-token KV state, then run by the Core ML backend's code over
the reference evaluator of its packages: it answers in real language, with the chat template and stop
token from the manifest, and its greedy tokens equal those of the torch wrapper carrying the int4
program's own weights.  (Levels 1 and 2 for this model: test_coreml_wrapper.py, and the spec checks
below.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mil_eval import single_threaded
from smoledge.quantize.coreml_quant import scheme_label
from smoledge.quantize.recipe import Recipe
from smoledge.runtime import ChatRequest, Message, SamplingConfig
from test_coreml_backend import reference_pipeline
from test_coreml_export import coreml_bundle
from test_coreml_numerics import with_program_weights
from test_coreml_wrapper import run_wrapper

pytestmark = pytest.mark.slow
CONTEXT, MAX_NEW = 256, 12
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def bundle(realtext_model_dir, tmp_path_factory):
    return coreml_bundle(tmp_path_factory, realtext_model_dir, "realtext-coreml-int4", "int4", context=CONTEXT)


@pytest.fixture(scope="module")
def pipe(bundle):
    return reference_pipeline(bundle)


@pytest.fixture(scope="module")
def answer(pipe):
    request = ChatRequest((Message.user(QUESTION),), SamplingConfig(max_new_tokens=MAX_NEW))
    chunks = list(pipe.stream(request))
    return request, [c.token_id for c in chunks], "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_the_int4_programs_answer_paris(answer):
    _, _, text, _ = answer
    assert "Paris" in text, text


def test_greedy_tokens_equal_torch_with_the_programs_weights(pipe, answer, realtext_model_dir):
    from transformers import SmolVLMForConditionalGeneration

    from smoledge.export.coreml_graphs import CoreMLEmbedTokens, StatefulDecoder

    request, tokens, _, _ = answer
    model = SmolVLMForConditionalGeneration.from_pretrained(realtext_model_dir, attn_implementation="eager").eval()
    programs = pipe.backend.models
    decoder = with_program_weights(StatefulDecoder(model, CONTEXT, torch.float16).eval(), programs["decoder"])
    embed = with_program_weights(CoreMLEmbedTokens(model).eval(), programs["embed_tokens"])
    ids = torch.from_numpy(pipe.prepare(request).input_ids)
    expected = [int(np.argmax(logits)) for logits in run_wrapper(decoder, embed, ids, len(tokens))]
    assert tokens == expected


def test_the_stop_token_comes_from_the_manifest(pipe, answer):
    _, tokens, _, reason = answer
    im_end = pipe.tokenizer.token_to_id("<|im_end|>")
    assert im_end in pipe.eos_ids
    assert reason == "stop" and tokens[-1] == im_end or reason == "length" and im_end not in tokens


def test_the_manifest_describes_the_real_model(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    section = manifest["artifacts"]["coreml"]
    text = manifest["model"]["text"]
    decoder = section["graphs"]["decoder"]
    assert decoder["states"]["key_cache"]["shape"] == [text["num_hidden_layers"], text["num_key_value_heads"],
                                                       CONTEXT, text["head_dim"]]
    assert decoder["outputs"]["logits"]["shape"] == [1, "query", text["vocab_size"]]
    assert 4.0 < decoder["quantization"]["bits_per_weight"] < 8.0
    recipe = Recipe.from_dict(section["recipe"])
    embed_scheme = scheme_label(recipe.scheme_for("model.text_model.embed_tokens"), "linear")
    assert section["graphs"]["embed_tokens"]["quantization"]["schemes"] == {embed_scheme: 1}
    reports = [m["quantization"] for m in section["graphs"].values()]
    assert sum(r["weight_bytes"] for r in reports) < 0.6 * sum(2 * r["weights"] for r in reports)
