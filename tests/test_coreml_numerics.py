"""Level 3 of the Core ML proof: the saved programs compute what the torch wrappers compute.

The packages are run by the reference evaluator in ``tests/mil_eval.py`` (coremltools' own per-op
value inference, fp16 storage, float32 arithmetic; state and constexpr ops handled by the evaluator).
This checks conversion, state and compression semantics.  It does not check Apple's kernels.

Tolerances (tiny model):

* fp16 program (fp32 recipe) vs the float32 torch wrapper: vision features within 3e-3 of their
  scale; decoder logits within 3e-2 of their scale at every teacher-forced step, and the top-1 token
  identical wherever the reference's top-1/top-2 margin is over twice the step's error.
* int4 program vs the torch wrapper carrying the program's own (decompressed) weights: 20 free-running
  greedy tokens identical.  Those weights are the recipe's quantization of the HF weights: each within
  half a quantization step of the original, and equal to coremltools' own decompression.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mil_eval import MilProgram, single_threaded
from smoledge.export.coreml_graphs import CoreMLEmbedTokens, CoreMLVisionEncoder, StatefulDecoder
from test_coreml_export import cli_int4_bundle, coreml_bundle
from test_coreml_wrapper import run_wrapper

VISION_TOL, LOGIT_TOL = 3e-3, 3e-2
STEPS, GREEDY_STEPS = 24, 20


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


def program(bundle, name: str) -> MilProgram:
    return MilProgram(bundle / "coreml" / f"{name}.mlpackage")


def with_program_weights(module: torch.nn.Module, prog: MilProgram) -> torch.nn.Module:
    """A copy of ``module`` whose 2-D weights are the program's (decompressed) ones.  coremltools names
    a weight's const after the module path: ``layers.0.mlp.up_proj.weight`` -> ``layers_0_mlp_up_proj_weight``."""
    module = copy.deepcopy(module)
    weights = prog.weights()
    loaded = set()
    with torch.no_grad():
        for name, param in module.named_parameters():
            flat = name.replace(".", "_") + "_to_fp16"
            for key in (flat, "p_" + flat):  # torch.export names parameters p_<path>
                if key in weights:
                    param.copy_(torch.from_numpy(weights[key].astype(np.float32)))
                    loaded.add(key)
    buffers = {name.replace(".", "_") + "_to_fp16" for name, _ in module.named_buffers()}  # RoPE tables
    assert loaded == set(weights) - buffers, f"weights not matched: {sorted(set(weights) - buffers - loaded)}"
    return module


def run_program(prog: MilProgram, embed, ids, steps: int, forced: list[int] | None = None):
    """The same loop as ``run_wrapper``, through the saved decoder program and its state."""
    from smoledge.runtime.backends.coreml import causal_mask

    state, past, x = prog.make_state(), 0, embed(ids)
    for step in range(steps):
        query = x.shape[1]
        feed = {"inputs_embeds": x.detach().numpy(), "position_ids": np.arange(past, past + query)[None],
                "causal_mask": causal_mask(past, query, -30000.0)}
        logits = prog.predict(feed, state)["logits"][0, -1].astype(np.float32)
        yield logits
        past += query
        x = embed(torch.tensor([[forced[step] if forced else int(np.argmax(logits))]]))


def _prompt(model, n: int = 9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(10, model.config.text_config.vocab_size, (1, n), generator=generator)


def test_fp16_vision_program_matches_torch(fp16_bundle, tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    side = model.config.vision_config.image_size
    prog = program(fp16_bundle, "vision_encoder")
    torch_vision = CoreMLVisionEncoder(model).eval()
    for seed in range(2):
        tile = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        with torch.no_grad():
            ref = torch_vision(tile).numpy()
        ours = prog.predict({"pixel_values": tile.numpy()})["image_features"].astype(np.float32)
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err < VISION_TOL, f"vision features differ by {err:.2e} of their scale"


def test_fp16_decoder_program_matches_torch_teacher_forced(fp16_bundle, tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    prog, embed = program(fp16_bundle, "decoder"), CoreMLEmbedTokens(model).eval()
    decoder = StatefulDecoder(model, 64, torch.float32).eval()
    ids = _prompt(model)
    reference = list(run_wrapper(decoder, embed, ids, STEPS))
    tokens = [int(np.argmax(r)) for r in reference]
    for step, (ours, ref) in enumerate(zip(run_program(prog, embed, ids, STEPS, tokens), reference)):
        err = np.abs(ours - ref).max()
        assert err / np.abs(ref).max() < LOGIT_TOL, f"step {step}: logits differ by {err:.3f}"
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 2 * err:
            assert int(np.argmax(ours)) == tokens[step], f"step {step}: top-1 differs at margin {top2[1] - top2[0]:.3f}"
    assert len(set(tokens)) > 3


def test_quantized_vision_program_matches_torch_with_its_weights(int4_bundle, tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    prog = program(int4_bundle, "vision_encoder")
    torch_vision = with_program_weights(CoreMLVisionEncoder(model).eval(), prog)
    side = model.config.vision_config.image_size
    tile = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        ref = torch_vision(tile).numpy()
    ours = prog.predict({"pixel_values": tile.numpy()})["image_features"].astype(np.float32)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < VISION_TOL


def test_embedding_program_is_a_table_lookup(int4_bundle, tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    prog = program(int4_bundle, "embed_tokens")
    table = prog.weights()["embed_weight_to_fp16"]
    ids = np.array([[0, 1, 7, model.config.text_config.vocab_size - 1]])
    np.testing.assert_array_equal(prog.predict({"input_ids": ids})["inputs_embeds"], table[ids])


def test_int4_decoder_program_matches_torch_with_its_weights(int4_bundle, tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    prog = program(int4_bundle, "decoder")
    capacity = prog.make_state()["key_cache"].shape[2]
    decoder = with_program_weights(StatefulDecoder(model, capacity, torch.float16).eval(), prog)
    embed = with_program_weights(CoreMLEmbedTokens(model).eval(), program(int4_bundle, "embed_tokens"))
    ids = _prompt(model)
    ref = [int(np.argmax(r)) for r in run_wrapper(decoder, embed, ids, GREEDY_STEPS)]
    ours = [int(np.argmax(r)) for r in run_program(prog, embed, ids, GREEDY_STEPS)]
    assert ours == ref
    assert len(set(ref)) > 3


def test_int4_weights_are_the_recipe_quantization_of_hf(int4_bundle, tiny_model_and_processor):
    """Each decompressed weight is within half a quantization step of its HF original (per block of 32
    along the input axis), and equals coremltools' own decompression of the same constants."""
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale as op

    model, _ = tiny_model_and_processor
    prog = program(int4_bundle, "decoder")
    hf = {name.replace(".", "_"): p for name, p in StatefulDecoder(model, 2).named_parameters()}
    for const in (o for o in prog.function.operations if o.op_type == "constexpr_blockwise_shift_scale"):
        ours = prog.constants[const.outputs[0]].astype(np.float32)
        theirs = op.decompress(const.data.val, const.scale.val, None if const.offset is None else const.offset.val)
        np.testing.assert_allclose(ours, theirs.astype(np.float32), rtol=2e-3, atol=1e-6)
        original = hf[const.name.removesuffix("_to_fp16_quantized")].detach().numpy()
        blocks = original.reshape(original.shape[0], -1, 32)
        bits = const.data.dtype.get_bitwidth()
        if const.offset is None:  # symmetric: [-absmax, absmax] onto [-(2**(b-1) - 1), 2**(b-1) - 1]
            step = np.abs(blocks).max(-1) / (2 ** (bits - 1) - 1)
        else:  # asymmetric: [min, max] onto 2**b levels
            step = (blocks.max(-1) - blocks.min(-1)) / (2 ** bits - 1)
        error = np.abs(ours - original).reshape(blocks.shape).max(-1)
        assert (error <= 0.5 * step + 1e-3 * np.abs(blocks).max(-1)).all(), const.name
        assert (ours != original.astype(np.float16)).any(), f"{const.name} was not quantized"


def test_palettized_decoder_runs_with_its_lookup_tables(tiny_model_and_processor, tmp_path):
    """The palettization option: k-means LUTs (``constexpr_lut_to_dense``), one per block of rows."""
    from smoledge.export.coreml_convert import convert_decoder, weight_names
    from smoledge.quantize.coreml_quant import compress, weight_report
    from smoledge.quantize.recipe import load_recipe

    model, _ = tiny_model_and_processor
    converted = convert_decoder(model, 32)
    recipe = load_recipe("int4")
    names = weight_names(converted.mlmodel._mil_program, converted.module, model)
    compressed = compress(converted.mlmodel, recipe, names, "palettize")
    compressed.save(str(tmp_path / "decoder.mlpackage"))
    prog = MilProgram(tmp_path / "decoder.mlpackage")
    # coremltools skips a weight whose rows its groups do not divide (the tiny lm_head: 400 rows), and
    # the report says so
    groupable = {c for c, w in prog.weights().items() if c in names and w.shape[0] % 32 == 0}
    assert prog.op_counts.get("constexpr_lut_to_dense") == len(groupable) > 0
    assert "constexpr_blockwise_shift_scale" not in prog.op_counts
    report = weight_report(compressed._mil_program, names, recipe, "palettize")
    assert report.schemes.get("float16", 0) == len(names) - len(groupable)
    for const in groupable:
        weight, bits = prog.weights()[const], recipe.scheme_for(names[const]).bits
        groups = weight.reshape(-1, 32, weight.shape[1])
        assert max(len(np.unique(group)) for group in groups) <= 2 ** bits, const
    decoder = with_program_weights(StatefulDecoder(model, 32, torch.float16).eval(), prog)
    embed = CoreMLEmbedTokens(model).eval()
    ids = _prompt(model, 5)
    ref = [int(np.argmax(r)) for r in run_wrapper(decoder, embed, ids, 10)]
    assert [int(np.argmax(r)) for r in run_program(prog, embed, ids, 10)] == ref
