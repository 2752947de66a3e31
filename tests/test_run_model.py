"""`smoledge run MODEL_FOLDER "prompt"`: a checkpoint folder is exported once into the smoledge cache, then reused."""

from __future__ import annotations

import pytest

from conftest import PARIS_QUESTION, run_cli
from smoledge.quantize.recipe import DEFAULT_RECIPE


@pytest.mark.slow
def test_a_model_folder_is_exported_once_then_reused(tiny_model_dir, tmp_path):
    env = {"SMOLEDGE_CACHE_DIR": str(tmp_path / "cache")}
    argv = ("run", str(tiny_model_dir), PARIS_QUESTION, "--temperature", "0", "--max-new-tokens", "6", "--no-cloud")
    first = run_cli(*argv, env=env)
    assert first.returncode == 0 and first.stdout.strip(), first.stderr
    assert f"exporting {tiny_model_dir} once ({DEFAULT_RECIPE}, onnx)" in first.stderr
    (bundle,) = (tmp_path / "cache" / "exports").iterdir()
    assert bundle.name.startswith(f"tiny-smolvlm-{DEFAULT_RECIPE}-onnx-") and (bundle / "manifest.json").is_file()
    built = (bundle / "manifest.json").stat().st_mtime_ns
    second = run_cli(*argv, env=env)
    assert second.returncode == 0 and second.stdout == first.stdout, second.stderr
    assert "exporting" not in second.stderr
    assert (bundle / "manifest.json").stat().st_mtime_ns == built
    assert [p.name for p in (tmp_path / "cache" / "exports").iterdir()] == [bundle.name]  # no leftovers
    from smoledge.cache_cli import scan

    assert [e.kind for e in scan(tmp_path / "cache") if e.path == bundle] == ["exports"]  # `smoledge cache` shows it


def test_the_cache_key_follows_what_the_bundle_is_built_from(tiny_model_dir, tmp_path):
    import shutil

    from smoledge.model_cache import cache_key

    base = cache_key("m", None, tiny_model_dir, "int4", ("onnx",))
    assert base == cache_key("m", None, tiny_model_dir, "int4", ("onnx",))
    assert base != cache_key("m", None, tiny_model_dir, "fp32", ("onnx",))
    assert base != cache_key("m", None, tiny_model_dir, "int4", ("executorch",))
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, copy)
    before = cache_key("m", None, copy, "int4", ("onnx",))
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")  # an edited checkpoint
    assert cache_key("m", None, copy, "int4", ("onnx",)) != before
    assert cache_key("org/m", "a" * 40, copy, "int4", ("onnx",)) != cache_key("org/m", "b" * 40, copy, "int4",
                                                                               ("onnx",))


def test_a_folder_that_is_neither_is_left_to_the_bundle_error(tmp_path):
    res = run_cli("run", str(tmp_path), "hi", "--no-cloud")
    assert res.returncode != 0 and "not a smoledge bundle" in res.stderr and "exporting" not in res.stderr
