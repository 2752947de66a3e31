"""The calibrated quantizers' pieces: block grids, MatMulNBits packing (run by onnxruntime), GPTQ, recipe data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from smoledge.errors import ConfigError
from smoledge.quantize.algorithms.gptq import gptq
from smoledge.quantize.algorithms.grid import matmul_nbits_node, search_grid, to_blocks
from smoledge.quantize.calibration import BUILTIN_TEXT, CalibrationSpec
from smoledge.quantize.recipe import Recipe, load_recipe


def _correlated(rng, tokens: int, k: int) -> np.ndarray:
    """Activations with a few loud channels and correlated ones, like a transformer's."""
    mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.normal(size=(tokens, k)) @ mix
    x[:, rng.choice(k, 4, replace=False)] *= 8
    return x.astype(np.float32)


def _run_matmul_nbits(weight: np.ndarray, x: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    import onnxruntime as ort

    k, n = weight.shape
    blocks = to_blocks(weight, block)
    grid = search_grid(blocks, None, bits, symmetric)
    q = grid.quantize(blocks)
    matmul = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="lin")
    node, inits = matmul_nbits_node(matmul, k, q, grid, accuracy_level=0)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                     [None, k])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, n])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    dequant = grid.dequantize(q).reshape(n, -1)[:, :k].T  # what the grid says W is
    return got, x @ dequant


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, True), (4, 64, False), (4, 128, False), (8, 64, True),
                                                  (8, 128, False)])
def test_packed_blocks_run_in_onnxruntime_as_the_grid_says(bits, block, symmetric):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(576, 48)).astype(np.float32)  # 576 = 4.5 blocks of 128, 9 of 64: odd counts
    got, expected = _run_matmul_nbits(weight, rng.normal(size=(3, 576)).astype(np.float32), bits, block, symmetric)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_grid_search_beats_min_max_rounding_on_the_weighted_error():
    rng = np.random.default_rng(1)
    blocks = to_blocks(rng.standard_t(4, size=(256, 32)).astype(np.float32), 32)
    importance = rng.gamma(0.5, size=(blocks.shape[1], 32)).astype(np.float32)
    for symmetric in (True, False):
        searched = search_grid(blocks, importance, 4, symmetric)
        err = (importance * (blocks - searched.dequantize(searched.quantize(blocks))) ** 2).sum()
        from smoledge.quantize.algorithms.grid import Grid, _candidate

        scale, zero = _candidate(blocks.min(-1), blocks.max(-1), 4, symmetric)
        plain = Grid(scale, zero, 4, 32, symmetric)
        plain_err = (importance * (blocks - plain.dequantize(plain.quantize(blocks))) ** 2).sum()
        assert err < 0.9 * plain_err


def test_symmetric_grid_puts_the_extreme_weight_on_the_longer_side():
    """Q4_0's signed scale: a block whose largest weight is positive still uses all 16 levels for it
    (the extreme lands on -8 exactly, with a negative scale), where a positive scale would map it to +7."""
    from smoledge.quantize.algorithms.grid import Grid, _candidate

    blocks = np.linspace(-0.5, 1.0, 32, dtype=np.float32).reshape(1, 1, 32)
    scale, zero = _candidate(blocks.min(-1), blocks.max(-1), 4, True)
    grid = Grid(scale, zero, 4, 32, True)
    q = grid.quantize(blocks)
    assert scale[0, 0] < 0 and q[0, 0, -1] == 0 and grid.dequantize(q)[0, 0, -1] == pytest.approx(1.0)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_on_the_same_grid(act_order):
    rng = np.random.default_rng(2)
    k, n = 256, 64
    weight = rng.normal(size=(k, n)).astype(np.float32)
    x = _correlated(rng, 2048, k)
    gram = x.T.astype(np.float64) @ x / len(x)
    blocks = to_blocks(weight, 64)
    grid = search_grid(blocks, np.diag(gram).reshape(-1, 64), 4, True)
    rounded = grid.dequantize(grid.quantize(blocks)).reshape(n, k).T
    q = gptq(weight, gram, grid, act_order=act_order)
    assert q.max() <= 15 and np.array_equal(grid.quantize(grid.dequantize(q)), q)  # on the grid
    compensated = grid.dequantize(q).reshape(n, k).T
    err = lambda w: float(np.mean((x @ weight - x @ w) ** 2))  # noqa: E731
    assert err(compensated) < 0.7 * err(rounded)


def test_recipe_carries_algorithm_zero_points_and_calibration_hash():
    recipe = Recipe.from_dict({"name": "t", "rules": [
        {"match": "lm_head", "scheme": {"bits": 8, "block_size": 128, "symmetric": True, "algorithm": "importance"}},
        {"match": "*", "scheme": {"bits": 4, "block_size": 64, "symmetric": False, "algorithm": "gptq"}}]})
    data = recipe.to_dict()
    assert data["calibration"]["sha256"] == CalibrationSpec().sha256() and data["calibration"]["text"] == "builtin"
    assert [r["scheme"]["zero_points"] for r in data["rules"]] == ["none", "uint4"]
    assert Recipe.from_dict(data).to_dict() == data  # a manifest's recipe loads back
    assert load_recipe("int4-sym-rtn").calibration is None  # RTN needs no calibration text
    assert BUILTIN_TEXT.stat().st_size > 2000


@pytest.mark.parametrize("scheme,message", [
    ({"algorithm": "hqq", "symmetric": True}, "hqq is 4-bit with zero points"),
    ({"algorithm": "awq"}, "unknown quantization algorithm"),
    ({"scale_dtype": "float16"}, "scale_dtype"),
    ({"algorithm": "gptq", "damp": 0}, "damp must be"),
])
def test_bad_schemes_are_config_errors(scheme, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict({"name": "bad", "rules": [{"match": "*", "scheme": scheme}]})


def test_int4_mixed_fits_five_bits_per_weight_on_smollm2_shapes():
    """The recipe's layout, by the bundle's own arithmetic (fp32 scales, 4 bits per uint4 zero point, blocks
    padded to whole blocks), on SmolLM2-135M's text weights (lm_head counted as its own matrix): <= 5.0
    bits, and no zero points on a block-32 rule (they could near the source GGUF's Q4_1 grid)."""
    hidden, mlp, kv, vocab, layers = 576, 1536, 192, 49216, 30
    recipe = load_recipe("int4-mixed").for_layers(layers)
    shapes = {"model.text_model.embed_tokens": (vocab, hidden), "lm_head": (vocab, hidden)}
    for i in range(layers):
        for proj, (n, k) in {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
                             "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
                             "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden),
                             "mlp.down_proj": (hidden, mlp)}.items():
            shapes[f"model.text_model.layers.{i}.{proj}"] = (n, k)
    bits = weights = 0
    for name, (n, k) in shapes.items():
        for start, stop, scheme in recipe.parts_for(name, n):
            assert scheme is not None and scheme.zero_points in ("none", "uint4"), name
            assert scheme.zero_points == "none" or scheme.block_size > 32, name
            blocks = -(-k // scheme.block_size)
            bits += (stop - start) * blocks * (scheme.block_size * scheme.bits + 32
                                               + (4 if scheme.zero_points == "uint4" else 0))
        weights += n * k
    assert [(a, b, s.bits) for a, b, s in recipe.parts_for("lm_head", vocab)] == [(0, 8192, 8), (8192, vocab, 4)]
    assert recipe.scheme_for("model.text_model.layers.29.mlp.down_proj").bits == 8
    assert recipe.scheme_for("model.text_model.layers.5.mlp.down_proj").block_size == 32
    assert recipe.scheme_for("model.text_model.layers.5.mlp.up_proj").zero_points == "uint4"
    assert 4.9 < bits / weights <= 5.0
    assert recipe.calibration is not None


def test_use_more_bits_follows_the_layer_count():
    """llama.cpp's use_more_bits as a layer selector: resolved against 30 layers (SmolLM2-135M) and 24 (the
    2.2B), the manifest form carries the resolved layers and loads back, and an unresolved selector refuses
    to answer rather than silently matching nothing."""
    from smoledge.quantize.recipe import first_last_eighth, use_more_bits

    assert use_more_bits(30) == (0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29)
    assert use_more_bits(24) == (0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23)
    assert first_last_eighth(30) == (0, 1, 2, 26, 27, 28, 29) and first_last_eighth(24) == (0, 1, 2, 21, 22, 23)
    recipe = load_recipe("int4-mixed")
    for layers in (30, 24):
        resolved = recipe.for_layers(layers)
        eight = [i for i in range(layers) if resolved.scheme_for(f"model.text_model.layers.{i}.mlp.down_proj").bits == 8]
        assert tuple(eight) == first_last_eighth(layers)
        assert Recipe.from_dict(resolved.to_dict()).to_dict() == resolved.to_dict()
    names = [f"model.text_model.layers.{i}.mlp.down_proj" for i in range(24)]
    assert recipe.for_weights(names).to_dict() == recipe.for_layers(24).to_dict()
    with pytest.raises(ConfigError, match="not resolved"):
        recipe.scheme_for("model.text_model.layers.0.mlp.down_proj")
    with pytest.raises(ConfigError, match="unknown layer selector"):
        Recipe.from_dict({"name": "bad", "rules": [{"match": "*", "layers": "every_other", "scheme": {}}]})


def test_calibrated_results_are_cached_by_weights_scheme_and_calibration(tmp_path, monkeypatch):
    """A second quantization of the same weights with the same scheme and calibration reads the cache and
    does not compute (nor collect calibration activations); another scheme or other weights do not hit."""
    from smoledge.quantize.algorithms import calibrated
    from smoledge.quantize.calibration import DeferredCalibration
    from smoledge.quantize.recipe import Scheme

    monkeypatch.setenv("SMOLEDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(calibrated.CACHE_ENV, raising=False)
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(128, 48)).astype(np.float32)
    x = _correlated(rng, 512, 128)
    runs = []

    def stats():
        def compute():
            runs.append(1)
            from smoledge.quantize.calibration import CalibrationStats
            return CalibrationStats({"lin": x.T.astype(np.float64) @ x}, len(x))
        return DeferredCalibration("source-a", {"lin"}, compute)

    scheme = Scheme(bits=4, block_size=64, symmetric=True, algorithm="gptq", act_order=True)
    q1, grid1 = calibrated.quantize_weight_cached(weight, scheme, stats(), "lin")
    assert runs == [1] and len(list(tmp_path.glob("quant/*.npz"))) == 1
    q2, grid2 = calibrated.quantize_weight_cached(weight, scheme, stats(), "lin")
    assert runs == [1]  # read back: no forward pass, no GPTQ
    assert np.array_equal(q1, q2) and np.array_equal(grid1.scale, grid2.scale) and np.array_equal(grid1.zero, grid2.zero)
    calibrated.quantize_weight_cached(weight, Scheme(bits=4, block_size=32, symmetric=True, algorithm="gptq"),
                                      stats(), "lin")
    calibrated.quantize_weight_cached(weight + 1e-3, scheme, stats(), "lin")
    assert runs == [1, 1, 1] and len(list(tmp_path.glob("quant/*.npz"))) == 3
    monkeypatch.setenv(calibrated.CACHE_ENV, "0")
    calibrated.quantize_weight_cached(weight, scheme, stats(), "lin")
    assert len(runs) == 4  # the switch turns the cache off


def test_file_backed_grams_equal_the_in_memory_sum_and_leave_no_scratch(tmp_path, monkeypatch):
    """collect() writes each layer's inputs to a scratch file (bfloat16) and forms X^T X on read: the matrix
    equals the fp64 sum of the per-sequence fp32 products of the bf16-rounded inputs, which is within bf16's
    rounding of the float32 inputs' own; layers reading one tensor share it, and the scratch folder goes
    with the object (a dead writer's folder goes with the next collect)."""
    import torch

    from smoledge.quantize.calibration import SEQUENCE, ActivationGrams

    monkeypatch.setenv("SMOLEDGE_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(5)
    stale = tmp_path / "quant" / "collect-999999999-x"
    stale.mkdir(parents=True)
    grams = ActivationGrams.in_scratch()
    assert not stale.exists() and grams.folder.parent == tmp_path / "quant"
    seqs = [_correlated(rng, SEQUENCE, 96), _correlated(rng, SEQUENCE // 2, 96)]
    for seq in seqs:
        grams.append("q", seq)
    grams.share("k", "q")
    rounded = [torch.from_numpy(s).to(torch.bfloat16).float() for s in seqs]
    expected = sum((r.T @ r).double() for r in rounded).numpy()
    assert set(grams) == {"q", "k"} and np.array_equal(grams["q"], expected) and np.array_equal(grams["k"], expected)
    exact = sum((torch.from_numpy(s).T @ torch.from_numpy(s)).double() for s in seqs).numpy()
    assert np.abs(expected - exact).max() <= 2 ** -7 * np.abs(exact).max()
    assert sum(f.stat().st_size for f in grams.folder.iterdir()) == 2 * sum(s.size for s in seqs)  # 2 bytes a value
    folder = grams.folder
    del grams
    assert not folder.exists()


def _rows_recipe(*rules) -> Recipe:
    return Recipe.from_dict({"name": "rows", "rules": list(rules)})


def test_rows_rules_claim_rows_in_rule_order():
    eight, four = {"bits": 8, "block_size": 32, "symmetric": True}, {"bits": 4, "block_size": 32, "symmetric": True}
    recipe = _rows_recipe({"match": "lm_head", "rows": [0, 100], "scheme": eight},
                          {"match": "lm_head", "rows": [50, 300], "scheme": {"bits": None}},
                          {"match": "*", "scheme": four})
    parts = [(a, b, s and s.bits) for a, b, s in recipe.parts_for("lm_head", 1000)]
    assert parts == [(0, 100, 8), (100, 300, None), (300, 1000, 4)]  # the first rule keeps rows 50-99
    assert [(a, b) for a, b, _ in recipe.parts_for("lm_head", 80)] == [(0, 80)]  # a range past the end is clipped
    assert [(a, b, s.bits) for a, b, s in recipe.parts_for("model.x", 10)] == [(0, 10, 4)]  # no rows rule: whole
    assert recipe.splits_rows and Recipe.from_dict(recipe.to_dict()) == recipe  # a manifest's recipe loads back
    assert recipe.to_dict()["rules"][0]["rows"] == [0, 100]
    # rows no rule claims stay float, like a weight no rule matches
    only = _rows_recipe({"match": "lm_head", "rows": [10, 20], "scheme": eight})
    assert [(a, b, s and s.bits) for a, b, s in only.parts_for("lm_head", 30)] == [(0, 10, None), (10, 20, 8),
                                                                                (20, 30, None)]
    with pytest.raises(ConfigError, match="only the ONNX target"):  # formats that cannot split refuse it
        recipe.scheme_for("lm_head")


@pytest.mark.parametrize("rows", [[5, 5], [-1, 4], [0], "0:8", [0.5, 8]])
def test_bad_rows_are_config_errors(rows):
    with pytest.raises(ConfigError, match="rows must be"):
        _rows_recipe({"match": "lm_head", "rows": rows, "scheme": {"bits": 8}})


def _matmul_and_gather_model(weight: np.ndarray, table: np.ndarray) -> onnx.ModelProto:
    h = onnx.helper
    nodes = [h.make_node("Gather", ["table", "ids"], ["emb"], name="model.text_model.embed_tokens"),
             h.make_node("Add", ["x", "emb"], ["x1"], name="add"),
             h.make_node("MatMul", ["x1", "w"], ["y"], name="lm_head")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, weight.shape[0]]),
                                      h.make_tensor_value_info("ids", onnx.TensorProto.INT64, [None])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, weight.shape[1]])],
                         [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(table, "table")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_a_weight_split_by_rows_computes_each_part_as_its_scheme_says(algorithm):
    """lm_head split by a rows rule: one MatMul(NBits) per part and a Concat, the same product as the
    whole weight; rows kept float are exact, 8-bit rows far closer than 4-bit ones; the report counts every
    part's bytes.  ``gptq`` parts read the whole weight's Hessian."""
    import onnxruntime as ort

    from smoledge.quantize.calibration import CalibrationStats
    from smoledge.quantize.onnx_quant import planned_schemes, quantize_model

    rng = np.random.default_rng(5)
    k, n = 128, 96
    weight, table = rng.normal(size=(k, n)).astype(np.float32), rng.normal(size=(7, k)).astype(np.float32)
    x, ids = _correlated(rng, 256, k), np.arange(7, dtype=np.int64) % 7
    recipe = _rows_recipe(
        {"match": "lm_head", "rows": [0, 16], "scheme": {"bits": None}},
        {"match": "lm_head", "rows": [16, 48], "scheme": {"bits": 8, "block_size": 32, "symmetric": True,
                                                           "algorithm": algorithm}},
        {"match": "lm_head", "scheme": {"bits": 4, "block_size": 32, "symmetric": False, "algorithm": algorithm}},
        {"match": "*", "scheme": {"bits": None}})  # the embedding stays float: the product is checked exactly
    stats = CalibrationStats({"lm_head": x.T.astype(np.float64) @ x}, len(x))
    model = _matmul_and_gather_model(weight, table)
    plan = planned_schemes(model, recipe)
    assert [name for name, s in plan.items() if name.startswith("lm_head")] == ["lm_head[0:16]", "lm_head[16:48]",
                                                                              "lm_head[48:96]"]
    quantized, report = quantize_model(model, recipe, stats)
    ops = [node.op_type for node in quantized.graph.node]
    assert ops.count("MatMul") == 1 and ops.count("MatMulNBits") == 2 and "Concat" in ops
    assert "w" not in {i.name for i in quantized.graph.initializer}  # the whole weight is gone
    got = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x[:7], "ids": ids})[0]
    want = (x[:7] + table[ids]) @ weight
    assert got.shape == want.shape
    np.testing.assert_allclose(got[:, :16], want[:, :16], rtol=1e-5, atol=1e-4)
    err8, err4 = (np.abs(got[:, s] - want[:, s]).mean() for s in (slice(16, 48), slice(48, None)))
    assert err8 < err4 / 5, (err8, err4)
    assert report.weights == k * n + 7 * k
    # bytes: float rows 4 per weight; 8-bit rows 1 + a 4-byte scale per block; 4-bit rows 1/2 + scale + 1/2 a
    # byte of zero point per block; the float embedding 4 per weight
    blocks = k // 32
    lm_head = 16 * k * 4 + 32 * (k + 4 * blocks) + 48 * (k // 2 + 4 * blocks + blocks // 2)
    assert report.weight_bytes == lm_head + 7 * k * 4
    assert report.schemes == {"float": 2, "int8-sym-b32-" + algorithm: 1, "int4-asym-b32-" + algorithm: 1}


def test_rows_rules_refuse_an_embedding_table():
    from smoledge.quantize.onnx_quant import quantize_model

    rng = np.random.default_rng(6)
    model = _matmul_and_gather_model(rng.normal(size=(64, 32)).astype(np.float32),
                                     rng.normal(size=(7, 64)).astype(np.float32))
    recipe = _rows_recipe({"match": "model.text_model.embed_tokens", "rows": [0, 4], "scheme": {"bits": 8}},
                          {"match": "*", "scheme": {"bits": 4, "block_size": 32, "symmetric": True}})
    with pytest.raises(ConfigError, match="only linear layers"):
        quantize_model(model, recipe)
