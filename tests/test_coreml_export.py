"""Level 2 of the Core ML proof: the exported packages are what the runtime expects.

``smoledge export --format coreml --quant int4`` adds three ``.mlpackage`` s to an existing ONNX bundle
of the tiny model.  Read back with coremltools' proto reader (no Core ML needed): inputs, outputs and
their dtypes, the flexible ``query`` / ``total`` ranges, the fp16 KV states, the iOS 18 spec version,
and the compression ops the recipe asks for (``constexpr_blockwise_shift_scale``, int4 data in the
decoder, int8 for lm_head and the vision encoder, nothing on RoPE tables or the patch conv).  The
manifest lists every file of every package with its sha256, and ``bundle verify`` checks them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from mil_eval import MilProgram
from smoledge.errors import BundleError, ConfigError

SPEC_IOS18 = 9
FLOAT16, INT32 = 65552, 131104  # ArrayFeatureType.DataType values


def coreml_bundle(tmp_path_factory, model_dir: Path, name: str, recipe: str, base: Path | None = None,
                  **options) -> Path:
    """Export (once per test session) a Core ML bundle; ``base``: an existing bundle to add it to."""
    from smoledge.export.pipeline import ExportJob, export_bundle
    from smoledge.export.target_coreml import CoreMLTargetOptions
    from smoledge.quantize.recipe import load_recipe

    out = tmp_path_factory.getbasetemp() / "coreml-bundles" / name
    if (out / "manifest.json").is_file():
        return out
    if base is not None:
        shutil.copytree(base, out)
    job = ExportJob(model=str(model_dir), out=out, recipe=load_recipe(recipe), formats=("coreml",),
                    target_options={"coreml": CoreMLTargetOptions(**options)})
    return export_bundle(job, show_progress=False)


def cli_int4_bundle(tiny_model_dir, tiny_int4_bundle, tmp_path_factory) -> Path:
    """The user's path (once per session): the CLI adds Core ML to the ONNX INT4 bundle of the checkpoint."""
    out = tmp_path_factory.getbasetemp() / "coreml-bundles" / "tiny-onnx+coreml-int4"
    if not (out / "manifest.json").is_file():
        shutil.copytree(tiny_int4_bundle, out)
        res = run_cli("export", str(tiny_model_dir), "--format", "coreml", "--quant", "int4", "--out", str(out),
                      "--no-progress", env={"OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def int4_bundle(tiny_model_dir, tiny_int4_bundle, tmp_path_factory) -> Path:
    return cli_int4_bundle(tiny_model_dir, tiny_int4_bundle, tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(int4_bundle) -> dict:
    return json.loads((int4_bundle / "manifest.json").read_text())


def _spec(bundle: Path, name: str):
    import coremltools as ct

    return ct.utils.load_spec(str(bundle / "coreml" / f"{name}.mlpackage"))


def _array(feature) -> tuple[list, int, list]:
    kind = feature.type.WhichOneof("Type")
    array = feature.type.stateType.arrayType if kind == "stateType" else feature.type.multiArrayType
    ranges = [(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges]
    return list(array.shape), array.dataType, ranges


def _ops(spec) -> list:
    main = spec.mlProgram.functions["main"]
    return list(main.block_specializations[main.opset].operations)


def test_the_bundle_keeps_onnx_and_adds_coreml(manifest):
    assert set(manifest["artifacts"]) == {"onnx", "coreml"}
    section = manifest["artifacts"]["coreml"]
    assert list(section["graphs"]) == ["vision_encoder", "embed_tokens", "decoder"]
    assert section["recipe"]["name"] == "int4"
    assert section["deployment_target"] == {"iOS": "18.0", "macOS": "15.0"}
    assert section["specification_version"] == SPEC_IOS18
    assert section["weight_bytes"] == sum(m["bytes"] for m in section["graphs"].values())


def test_every_package_file_is_listed_with_its_sha256(int4_bundle, manifest):
    from smoledge.runtime.bundle import open_bundle, sha256_file

    for name, entry in manifest["artifacts"]["coreml"]["graphs"].items():
        package = int4_bundle / entry["file"]
        on_disk = sorted(p.relative_to(int4_bundle).as_posix() for p in package.rglob("*") if p.is_file())
        assert on_disk == entry["files"], name
        assert any(f.endswith("weights/weight.bin") for f in on_disk)
        for rel in on_disk:
            assert manifest["files"][rel]["sha256"] == sha256_file(int4_bundle / rel)
            assert manifest["files"][rel]["size"] == (int4_bundle / rel).stat().st_size
        assert entry["bytes"] == sum((int4_bundle / rel).stat().st_size for rel in on_disk)
    assert set(open_bundle(int4_bundle).verify()) == set(manifest["files"])


def test_bundle_verify_catches_a_changed_weight_file(int4_bundle, tmp_path):
    from smoledge.runtime.bundle import open_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(int4_bundle, copy)
    weights = copy / "coreml" / "decoder.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin"):
        open_bundle(copy, verify=False).verify()


def test_decoder_spec_is_stateful_flexible_and_fp16(int4_bundle, manifest):
    section = manifest["artifacts"]["coreml"]
    capacity = section["context_capacity"]
    text = manifest["model"]["text"]
    spec = _spec(int4_bundle, "decoder")
    assert spec.specificationVersion == SPEC_IOS18
    inputs = {f.name: _array(f) for f in spec.description.input}
    assert list(inputs) == ["inputs_embeds", "position_ids", "causal_mask"]
    flexible = (1, capacity)
    assert inputs["inputs_embeds"][1:] == (FLOAT16, [(1, 1), flexible, (text["hidden_size"],) * 2])
    assert inputs["position_ids"][1:] == (INT32, [(1, 1), flexible])
    assert inputs["causal_mask"][1:] == (FLOAT16, [(1, 1), (1, 1), flexible, flexible])
    states = {f.name: _array(f) for f in spec.description.state}
    shape = [text["num_hidden_layers"], text["num_key_value_heads"], capacity, text["head_dim"]]
    assert states == {"key_cache": (shape, FLOAT16, []), "value_cache": (shape, FLOAT16, [])}
    assert [f.name for f in spec.description.output] == ["logits"]
    assert section["graphs"]["decoder"]["states"]["key_cache"]["shape"] == shape


def test_vision_and_embedding_specs(int4_bundle, manifest):
    side = manifest["model"]["vision"]["image_size"]
    vision = _spec(int4_bundle, "vision_encoder")
    assert [(f.name, *_array(f)) for f in vision.description.input] == [
        ("pixel_values", [1, 3, side, side], FLOAT16, [])]
    assert [f.name for f in vision.description.output] == ["image_features"]
    embed = _spec(int4_bundle, "embed_tokens")
    capacity = manifest["artifacts"]["coreml"]["context_capacity"]
    assert [(f.name, _array(f)[1], _array(f)[2]) for f in embed.description.input] == [
        ("input_ids", INT32, [(1, 1), (1, capacity)])]
    assert all(s.specificationVersion == SPEC_IOS18 for s in (vision, embed))


def _compressed_weights(bundle: Path, name: str) -> dict[str, tuple[int, bool]]:
    """{weight const name: (bits, has offset)} for every block-quantized weight of a saved program."""
    program = MilProgram(bundle / "coreml" / f"{name}.mlpackage")
    found = {}
    for op in program.function.operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            found[op.name.removesuffix("_quantized")] = (op.data.dtype.get_bitwidth(), op.offset is not None)
    return found


def _expected(recipe, hf_names: dict[str, str]) -> dict[str, tuple[int, bool]]:
    """What the recipe asks for each weight: {const name: (bits, asymmetric)}, float weights left out."""
    schemes = {const: recipe.scheme_for(hf) for const, hf in hf_names.items()}
    return {const: (s.bits, not s.symmetric) for const, s in schemes.items() if s is not None}


def test_compression_follows_the_recipe(int4_bundle, manifest, tiny_model_and_processor):
    """Every linear (and the embedding table) carries exactly the bits and offset its recipe rule says;
    coremltools names a weight's const after the wrapper attribute path (``layers_0_mlp_up_proj_weight``)."""
    from smoledge.quantize.recipe import Recipe

    model, _ = tiny_model_and_processor
    recipe = Recipe.from_dict(manifest["artifacts"]["coreml"]["recipe"])
    linears = {n.removesuffix(".weight"): n for n, p in model.named_parameters()
               if p.dim() == 2 and n.startswith("model.text_model.layers.")}
    decoder = {f"{n.removeprefix('model.text_model.').replace('.', '_')}_to_fp16": hf for hf, n in
               linears.items()} | {"lm_head_weight_to_fp16": "lm_head"}
    assert _compressed_weights(int4_bundle, "decoder") == _expected(recipe, decoder)
    embed = {"embed_weight_to_fp16": "model.text_model.embed_tokens"}
    assert _compressed_weights(int4_bundle, "embed_tokens") == _expected(recipe, embed)
    vision = _compressed_weights(int4_bundle, "vision_encoder")
    vision_layers = manifest["model"]["vision"]["num_hidden_layers"]
    asked = recipe.scheme_for("model.vision_model.encoder.layers.0.mlp.fc1")
    assert set(vision.values()) == {(asked.bits, not asked.symmetric)} and len(vision) == 6 * vision_layers + 1
    ops = [op.type for op in _ops(_spec(int4_bundle, "decoder"))]
    assert ops.count("constexpr_blockwise_shift_scale") == len(decoder), "RoPE tables must stay plain fp16"


def test_the_manifest_reports_what_the_program_holds(manifest, tiny_model_and_processor):
    from collections import Counter

    from smoledge.quantize.coreml_quant import scheme_label
    from smoledge.quantize.recipe import Recipe

    model, _ = tiny_model_and_processor
    section = manifest["artifacts"]["coreml"]
    recipe = Recipe.from_dict(section["recipe"])
    names = [n.removesuffix(".weight") for n, p in model.named_parameters()
             if p.dim() == 2 and n.startswith("model.text_model.layers.")] + ["lm_head"]
    expected = Counter(scheme_label(recipe.scheme_for(n), "linear") for n in names)
    report = section["graphs"]["decoder"]["quantization"]
    assert report["schemes"] == dict(expected)
    assert 4 < report["bits_per_weight"] < 9


def test_no_program_holds_a_non_finite_constant(int4_bundle):
    for name in ("vision_encoder", "embed_tokens", "decoder"):
        prog = MilProgram(int4_bundle / "coreml" / f"{name}.mlpackage")
        for var, value in prog.constants.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                assert np.isfinite(value).all(), f"{name}: {var.name}"


def test_fp32_recipe_leaves_every_weight_fp16(tiny_model_dir, tmp_path_factory):
    bundle = coreml_bundle(tmp_path_factory, tiny_model_dir, "tiny-coreml-fp32", "fp32", context=256)
    section = json.loads((bundle / "manifest.json").read_text())["artifacts"]["coreml"]
    for name in section["graphs"]:
        assert not any(op.type.startswith("constexpr_") for op in _ops(_spec(bundle, name))), name
        assert section["graphs"][name]["precision"] == "fp16"
    assert section["context_capacity"] == 256


def test_hqq_recipe_is_refused_for_coreml():
    from smoledge.quantize.coreml_quant import optimization_config
    from smoledge.quantize.recipe import Recipe

    recipe = Recipe.from_dict({"name": "hqq", "rules": [{"match": "*", "scheme": {"bits": 4, "algorithm": "hqq"}}]})
    with pytest.raises(ConfigError, match="hqq"):
        optimization_config(recipe, {"w": "model.text_model.layers.0.mlp.up_proj"}, "linear")
    with pytest.raises(ConfigError, match="compression"):
        optimization_config(recipe, {}, "sparse")


def test_context_must_fit_the_model(tiny_model_and_processor):
    from smoledge.export.target_coreml import CoreMLTargetOptions, capacity_for

    model, _ = tiny_model_and_processor
    window = model.config.text_config.max_position_embeddings
    assert capacity_for(model, CoreMLTargetOptions(context=None)) == window
    with pytest.raises(ConfigError, match="context window"):
        capacity_for(model, CoreMLTargetOptions(context=window + 1))


def test_weight_names_follow_the_module_not_the_tied_parameter(tiny_model_and_processor):
    """A tied embedding / lm_head is named after the module each wrapper holds."""
    import torch

    from smoledge.export.coreml_convert import hf_parameter_names
    from smoledge.export.coreml_graphs import CoreMLEmbedTokens

    model, _ = tiny_model_and_processor
    embed = CoreMLEmbedTokens(model)
    assert list(hf_parameter_names(embed, model).values()) == ["model.text_model.embed_tokens"]
    tied = torch.nn.Module()
    tied.lm_head = torch.nn.Linear(4, 3, bias=False)
    tied.embed = torch.nn.Embedding(3, 4)
    tied.embed.weight = tied.lm_head.weight
    holder = torch.nn.Module()
    holder.lm_head = tied.lm_head
    assert list(hf_parameter_names(holder, tied).values()) == ["lm_head"]
