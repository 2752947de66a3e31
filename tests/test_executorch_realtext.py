"""The real-text SmolVLM (SmolLM2-135M-Instruct decoder) as a 4-bit ``.pte``.

It answers the capital-of-France question with Paris through ``smoledge run --backend executorch``
(template and stop tokens from the manifest), and ExecuTorch's C++ ``MultimodalRunner``, handed the
bundle's ``model.pte`` + ``tokenizer.json`` and the rendered prompt as text -- tokenised on its side, as
an Android app's ``LlmModule`` would -- gives the same answer.  Slow: exporting the real model to
ExecuTorch takes about 9 CPU minutes.
"""

from __future__ import annotations

import pytest

from conftest import PARIS_QUESTION, run_cli
from smoledge.runtime import ChatRequest, Message, SamplingConfig, load

pytestmark = pytest.mark.slow

QUESTION = PARIS_QUESTION


@pytest.fixture(scope="module")
def bundle(realtext_et_bundle):
    return realtext_et_bundle


def test_answers_paris_through_the_cli(bundle):
    res = run_cli("run", str(bundle), "--backend", "executorch", "--prompt", QUESTION, "--max-new-tokens", "24",
                  "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_each_format_records_the_recipe_it_took(bundle):
    """The default recipe is calibrated; the .pte takes its ExecuTorch fallback (int4, RTN) and says so."""
    from smoledge.runtime.bundle import open_bundle

    opened = open_bundle(bundle, verify=False)
    onnx, pte = opened.artifact("onnx"), opened.artifact("executorch")
    assert onnx.recipe_name == "int4-mixed"
    assert pte.recipe_name == "int4" and pte.recipe["replaces"] == "int4-mixed"
    info = run_cli("bundle", "info", str(bundle)).stdout
    assert "executorch recipe int4," in info and "onnx       recipe int4-mixed," in info, info


def test_cpp_multimodal_runner_gives_the_same_answer_from_the_prompt_text(bundle):
    try:
        import executorch.extension.llm.runner as runner_module
    except (ImportError, RuntimeError) as err:
        pytest.skip(f"ExecuTorch's MultimodalRunner pybindings are not in this executorch install: {err}")
    from smoledge.runtime.backends.executorch import load_kernel_libraries

    pipe = load(bundle, backend="executorch")
    request = ChatRequest((Message.user(QUESTION),), SamplingConfig(max_new_tokens=24))
    ours = pipe.generate(request)
    ids = pipe.prepare(request).input_ids[0].tolist()
    prompt = pipe.tokenizer.decode(ids, skip_special_tokens=False)
    assert pipe.tokenizer.encode(prompt, add_special_tokens=False).ids == ids

    load_kernel_libraries()
    section = pipe.bundle.artifact("executorch")
    runner = runner_module.MultimodalRunner(str(bundle / section.graphs["decoder"].file), str(bundle / "tokenizer.json"))
    pieces, stats = [], []
    config = runner_module.GenerationConfig(echo=False, max_new_tokens=24, temperature=0.0)
    runner.generate([runner_module.make_text_input(prompt)], config, pieces.append,
                    lambda s: stats.append(s.num_prompt_tokens))
    assert stats == [len(ids)]  # HFTokenizer on the C++ side agrees with ours
    eos_text = {pipe.tokenizer.decode([i], skip_special_tokens=False) for i in pipe.eos_ids}
    answer = "".join(p for p in pieces if p not in eos_text)
    assert "Paris" in ours and answer.strip() == ours.strip()
