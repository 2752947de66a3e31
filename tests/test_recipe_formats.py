"""A recipe's per-format fallback (``"formats": {"executorch": "int4", ...}``) and the default recipe.

The default ``int4-mixed`` is calibrated (GPTQ grids); ExecuTorch and Core ML compute their own
round-to-nearest scales, and its layout by RTN is worse than ``int4`` (KL 0.293 against 0.119 on the
real-text weights, docs/quantization.md), so those formats take ``int4`` as the recipe's data says.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from smoledge.errors import ConfigError
from smoledge.progress import Progress
from smoledge.quantize.recipe import DEFAULT_RECIPE, Recipe, load_recipe, with_vision_precision

RULES = [{"match": "*", "scheme": {"bits": 4, "block_size": 32, "symmetric": True}}]


def write(folder: Path, name: str, **extra) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"name": name, "rules": RULES, **extra}))
    return path


def test_the_default_takes_int4_where_a_format_cannot_take_its_grids():
    recipe = load_recipe(DEFAULT_RECIPE)
    assert DEFAULT_RECIPE == "int4-mixed" and any(r.scheme.calibrated for r in recipe.rules)
    assert recipe.for_format("onnx") is recipe
    for fmt in ("executorch", "coreml"):
        fallback = recipe.for_format(fmt)
        assert fallback.name == "int4" and fallback.replaces == "int4-mixed"
        assert not any(r.scheme.calibrated for r in fallback.rules)
        assert fallback.rules == load_recipe("int4").rules


def test_the_manifest_records_the_fallback_and_loads_back():
    recipe = load_recipe(DEFAULT_RECIPE)
    primary, fallback = recipe.to_dict(), recipe.for_format("executorch").to_dict()
    assert primary["formats"] == {"executorch": "int4", "coreml": "int4"} and "replaces" not in primary
    assert fallback["name"] == "int4" and fallback["replaces"] == "int4-mixed" and "formats" not in fallback
    for data in (primary, fallback):
        assert Recipe.from_dict(data).to_dict() == data


def test_int4_is_unchanged_by_the_new_default():
    recipe = load_recipe("int4")
    assert recipe.formats == {} and recipe.replaces is None
    assert all(recipe.for_format(fmt) is recipe for fmt in ("onnx", "executorch", "coreml"))


def test_a_vision_override_reaches_the_fallback_too():
    recipe = with_vision_precision(load_recipe(DEFAULT_RECIPE), "fp32")
    fallback = recipe.for_format("coreml")
    assert fallback.name == "int4+vision-fp32" and fallback.replaces == "int4-mixed+vision-fp32"
    assert fallback.scheme_for("model.vision_model.encoder.layers.0.mlp.fc1") is None  # kept float


def test_an_unknown_format_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'tflite', which is not a format") as err:
        load_recipe(write(tmp_path, "r", formats={"tflite": "int4"}))
    assert "executorch" in err.value.hint


def test_a_fallback_that_is_not_a_string_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="must be a recipe name or path"):
        load_recipe(write(tmp_path, "r", formats={"coreml": {"name": "int4"}}))
    with pytest.raises(ConfigError, match="must map a format to a recipe"):
        load_recipe(write(tmp_path, "r", formats=["coreml"]))


def test_an_unknown_fallback_recipe_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match="'int5' \\(the executorch fallback of recipe 'r'\\)") as err:
        load_recipe(write(tmp_path, "r", formats={"executorch": "int5"}))
    assert "int4-mixed" in err.value.hint  # the built-in names


def test_fallbacks_chain_and_paths_are_relative_to_the_recipe(tmp_path):
    write(tmp_path, "b", formats={"coreml": "int4"})
    recipe = load_recipe(write(tmp_path, "a", formats={"coreml": "b.json", "executorch": "b.json"}))
    assert recipe.for_format("coreml").name == "int4"  # a -> b -> int4
    assert recipe.for_format("executorch").name == "b"  # b has no executorch entry: the chain ends there
    assert recipe.for_format("coreml").replaces == recipe.for_format("executorch").replaces == "a"


@pytest.mark.parametrize("links", [{"a": "a.json"}, {"a": "b.json", "b": "a.json"},
                                   {"a": "b.json", "b": "c.json", "c": "b.json"}])
def test_a_cycle_is_refused(tmp_path, links):
    for name in ("a", "b", "c"):
        write(tmp_path, name, **({"formats": {"executorch": links[name]}} if name in links else {}))
    with pytest.raises(ConfigError, match="the executorch fallbacks form a cycle"):
        load_recipe(tmp_path / "a.json")


def test_links_through_other_formats_are_not_a_cycle(tmp_path):
    write(tmp_path, "b", formats={"coreml": "a.json"})
    recipe = load_recipe(write(tmp_path, "a", formats={"executorch": "b.json"}))
    assert recipe.for_format("executorch").name == "b" and recipe.for_format("coreml") is recipe


def test_an_unresolved_fallback_says_how_to_resolve_it():
    recipe = Recipe.from_dict(load_recipe(DEFAULT_RECIPE).to_dict())  # e.g. a manifest's record
    with pytest.raises(ConfigError, match="was not resolved"):
        recipe.for_format("executorch")


def test_the_export_says_which_recipe_a_format_took():
    from smoledge.export.pipeline import target_recipe

    stream = io.StringIO()
    with Progress("export", stream=stream, tty=False, summary=False) as bar:
        recipe = load_recipe(DEFAULT_RECIPE)
        onnx = target_recipe(recipe, "onnx", 30, bar)
        coreml = target_recipe(recipe, "coreml", 30, bar)
    assert onnx.name == "int4-mixed" and coreml.name == "int4"
    assert stream.getvalue().splitlines() == ["coreml: recipe int4 (the coreml fallback of int4-mixed)"]
    # layer selectors resolved against the model, as before: 7 of 30 layers' down_proj at 8 bits
    assert onnx.scheme_for("model.text_model.layers.29.mlp.down_proj").bits == 8
    assert onnx.scheme_for("model.text_model.layers.10.mlp.down_proj").bits == 4


def test_export_and_run_default_to_the_default_recipe():
    import argparse

    from smoledge import model_cache
    from smoledge.export.cli import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert parser.parse_args(["m", "--out", "o"]).quant == DEFAULT_RECIPE
    assert parser.parse_args(["m", "--out", "o", "--quant", "int4"]).quant == "int4"
    assert model_cache.DEFAULT_RECIPE == DEFAULT_RECIPE
    # `smoledge run MODEL_FOLDER --backend executorch` says what the .pte will hold before it exports
    assert model_cache._fallbacks(DEFAULT_RECIPE, ("executorch",)) == "; executorch takes int4"
    assert model_cache._fallbacks(DEFAULT_RECIPE, ("onnx",)) == model_cache._fallbacks("int4", ("coreml",)) == ""


@pytest.mark.slow  # a tiny Core ML export: ~35 s here
@pytest.mark.skipif(not __import__("importlib").util.find_spec("coremltools"), reason="coremltools is not installed")
def test_a_default_export_gives_core_ml_its_fallback_and_says_so(tiny_model_dir, tmp_path):
    """Through the CLI, without --quant: the Core ML section holds int4 (RTN), recorded as replacing the
    default, and the progress stream said so."""
    from conftest import run_cli

    out = tmp_path / "b"
    res = run_cli("export", str(tiny_model_dir), "--format", "coreml", "--out", str(out),
                  env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "coreml: recipe int4 (the coreml fallback of int4-mixed)" in res.stderr
    section = json.loads((out / "manifest.json").read_text())["artifacts"]["coreml"]
    assert section["recipe"]["name"] == "int4" and section["recipe"]["replaces"] == "int4-mixed"
    assert section["recipe"]["rules"] == load_recipe("int4").to_dict()["rules"]
    assert "calibration" not in section["recipe"]  # nothing was calibrated for it
    info = run_cli("bundle", "info", str(out))
    assert "coreml     recipe int4," in info.stdout, info.stdout
