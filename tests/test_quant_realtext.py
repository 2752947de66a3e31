"""On the real-text weights (SmolLM2-135M), each calibrated algorithm beats onnxruntime's RTN at the same
bits per weight: every linear of three decoder layers, quantized through ``quantize_model``
(calibrated on the shipped calibration text), run by onnxruntime on the activations of the *scored*
fidelity text, which the calibration never saw.  The end-to-end KL of each recipe is in
docs/quantization.md (``python -m smoledge.benchmarks.quant_sweep``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from smoledge.quantize.calibration import CalibrationSpec, collect
from smoledge.fidelity import TEXT_FILE
from smoledge.quantize.onnx_quant import quantize_model
from smoledge.quantize.recipe import Recipe

pytestmark = pytest.mark.slow
LAYERS = (0, 15, 29)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
NAMES = tuple(f"model.text_model.layers.{i}.{p}" for i in LAYERS for p in PROJ)


@pytest.fixture(scope="module")
def realtext(realtext_model_dir):
    """(weights W[K, N] per linear, calibration stats, held-out inputs per linear)."""
    import torch

    from smoledge.export.loader import load_model, resolve

    model = load_model(resolve(str(realtext_model_dir)))
    tokenizer = realtext_model_dir / "tokenizer.json"
    stats = collect(model, CalibrationSpec(tokens=1024), tokenizer)
    modules = dict(model.named_modules())
    held_out, hooks = {}, []
    for name in NAMES:
        hooks.append(modules[name].register_forward_pre_hook(
            lambda _m, args, name=name: held_out.__setitem__(name, args[0][0].numpy().copy())))
    from tokenizers import Tokenizer

    ids = torch.tensor([Tokenizer.from_file(str(tokenizer)).encode(TEXT_FILE.read_text()).ids[:256]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in hooks:
        h.remove()
    weights = {n: modules[n].weight.detach().numpy().T.copy() for n in NAMES}
    return weights, stats, held_out


def _graph(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes, inputs, outputs, inits = [], [], [], []
    for i, (name, w) in enumerate(weights.items()):
        k, n = w.shape
        nodes.append(onnx.helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"], name=name))
        inputs.append(onnx.helper.make_tensor_value_info(f"x{i}", onnx.TensorProto.FLOAT, [None, k]))
        outputs.append(onnx.helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [None, n]))
        inits.append(onnx.numpy_helper.from_array(w, f"w{i}"))
    graph = onnx.helper.make_graph(nodes, "linears", inputs, outputs, inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)


def _relative_errors(realtext, algorithm: str, block: int, symmetric: bool) -> tuple[dict[str, float], float]:
    import onnxruntime as ort

    weights, stats, held_out = realtext
    recipe = Recipe.from_dict({"name": algorithm, "rules": [{"match": "*", "scheme": {
        "bits": 4, "block_size": block, "symmetric": symmetric, "algorithm": algorithm}}]})
    model, report = quantize_model(_graph(weights), recipe, stats)
    assert report.schemes.get("float", 0) == 0, report.schemes
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {f"x{i}": held_out[n] for i, n in enumerate(weights)})
    errors = {n: float(np.sum((held_out[n] @ weights[n] - y) ** 2) / np.sum((held_out[n] @ weights[n]) ** 2))
              for n, y in zip(weights, got)}
    return errors, report.bits_per_weight


@pytest.mark.parametrize("algorithm,block,symmetric", [("gptq", 128, True), ("importance", 128, True),
                                                       ("gptq", 64, False)])
def test_calibrated_algorithm_beats_rtn_at_the_same_bits(realtext, algorithm, block, symmetric):
    rtn, rtn_bpw = _relative_errors(realtext, "rtn", block, symmetric)
    calibrated, bpw = _relative_errors(realtext, algorithm, block, symmetric)
    assert bpw == pytest.approx(rtn_bpw)  # same blocks, same scales and zero points
    assert np.mean(list(calibrated.values())) < 0.9 * np.mean(list(rtn.values())), (calibrated, rtn)
    assert sum(calibrated[n] < rtn[n] for n in NAMES) >= 0.8 * len(NAMES), (calibrated, rtn)
