"""The manifest schema: typed sections, one error listing every mismatch, the published JSON Schema, and
no raw manifest reads anywhere else in the code."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest

from conftest import REPO
from manifest_examples import example_manifest
from smoledge.errors import BundleError
from smoledge.runtime.bundle import open_bundle
from smoledge.runtime.manifest import SCHEMA_FILE, SCHEMA_VERSION, Manifest, json_schema


def _data(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))


def test_the_schema_file_is_generated_from_the_types():
    """Regenerate with: python -c 'from smoledge.runtime.manifest import write_json_schema; write_json_schema()'"""
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema()
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_the_schema_file_is_installed_with_the_runtime():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert SCHEMA_FILE.name in data["tool"]["setuptools"]["package-data"]["smoledge.runtime"]
    assert SCHEMA_FILE.parent == REPO / "runtime"


def test_a_bundle_round_trips_through_the_types(tiny_int4_bundle):
    data = _data(tiny_int4_bundle)
    manifest = Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert list(manifest.artifacts["onnx"].graphs) == ["vision_encoder", "embed_tokens", "decoder"]
    assert manifest.artifacts["onnx"].graphs["decoder"].file == "onnx/decoder_model_merged.onnx"
    assert list(_validator().iter_errors(data)) == []


def test_export_writes_the_figures_the_router_and_cloud_read(tiny_int4_bundle):
    manifest = open_bundle(tiny_int4_bundle, verify=False).manifest
    assert manifest.memory.activation_bytes > 0
    assert manifest.memory.weight_bytes == manifest.artifacts["onnx"].weight_bytes
    assert manifest.cloud.substitute_model is None and manifest.cloud.alternatives == ()


def test_every_mismatch_is_listed_in_one_error(tiny_int4_bundle):
    data = _data(tiny_int4_bundle)
    data["files"] = list(data["files"])
    data["context_length"] = "4096"
    data["generation"] = {}
    data["surprise"] = 1
    del data["artifacts"]["onnx"]["graphs"]["embed_tokens"]
    with pytest.raises(BundleError) as caught:
        Manifest.from_dict(data, "B")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"the manifest of B does not match schema {SCHEMA_VERSION} (")
    for problem in ("files: expected an object, got an array", "context_length: expected an integer, got a string",
                    "generation.max_new_tokens: missing", "generation.eos_token_ids: missing", "surprise: unknown key",
                    "artifacts.onnx.graphs.embed_tokens: missing"):
        assert problem in message
    assert "re-export the bundle" in message
    assert not _validator().is_valid(data)


def test_the_json_schema_and_the_types_agree_on_bad_manifests(tiny_int4_bundle):
    base = _data(tiny_int4_bundle)
    breakages = [
        lambda d: d["model"]["text"].update(hidden_size=1.5),
        lambda d: d["tokens"].update(bos_token=7),
        lambda d: d["artifacts"]["onnx"].update(context_capacity=0),
        lambda d: d["artifacts"]["onnx"].update(format="coreml"),
        lambda d: d["artifacts"].update(tflite={}),
        lambda d: d["artifacts"].clear(),
        lambda d: d["generation"].update(eos_token_ids=[]),
        lambda d: d["memory"].pop("activation_bytes"),
        lambda d: d["cloud"].update(alternatives="acme/x"),
        lambda d: d["artifacts"]["onnx"]["graphs"]["decoder"]["inputs"]["inputs_embeds"].update(shape=[1.5]),
    ]
    for i, breakage in enumerate(breakages):
        data = copy.deepcopy(base)
        breakage(data)
        with pytest.raises(BundleError):
            Manifest.from_dict(data)
        assert not _validator().is_valid(data), i


def test_a_zero_kv_capacity_is_refused_naming_the_field(tiny_int4_bundle):
    data = _data(tiny_int4_bundle)
    data["artifacts"]["onnx"]["context_capacity"] = 0
    with pytest.raises(BundleError, match=r"artifacts\.onnx\.context_capacity: must be at least 1, got 0"):
        Manifest.from_dict(data)


def test_older_and_newer_schemas_say_what_to_do(tiny_int4_bundle):
    data = _data(tiny_int4_bundle)
    with pytest.raises(BundleError, match=f"schema 1, older .*re-export it with this smoledge version "
                                          f"\\(schema {SCHEMA_VERSION}\\)"):
        Manifest.from_dict({**data, "schema_version": 1, "memory": None}, "B")
    with pytest.raises(BundleError, match="newer than this smoledge reads .*upgrade smoledge"):
        Manifest.from_dict({**data, "schema_version": SCHEMA_VERSION + 1}, "B")


def test_runtime_fallback_and_bench_receive_the_typed_manifest(tiny_int4_bundle, tmp_path):
    import argparse

    from smoledge.benchmarks.models import PromptMaker
    from smoledge.cloud_fallback import add_routing_arguments, answer, router_config_from_args
    from smoledge.runtime import ChatRequest, Message, SamplingConfig, load

    pipe = load(tiny_int4_bundle)
    assert isinstance(pipe.bundle.manifest, Manifest) and isinstance(pipe.manifest, Manifest)
    parser = argparse.ArgumentParser()
    add_routing_arguments(parser)
    config = router_config_from_args(parser.parse_args(["--no-cloud"]), {"SMOLEDGE_CACHE_DIR": str(tmp_path)})
    result = answer(ChatRequest((Message.user("hi"),), SamplingConfig(max_new_tokens=2)), pipe, config=config)
    chunks = list(result)
    assert result.decision.route == "local" and chunks
    assert result.decision.estimate.weight_bytes == pipe.manifest.memory.weight_bytes
    assert isinstance(PromptMaker(tiny_int4_bundle).manifest, Manifest)
    assert isinstance(example_manifest(), Manifest)


# Raw reads of the manifest: a subscript or .get on something called manifest, a manifest-only key as a
# string subscript, or manifest.json parsed by hand.
_RAW = re.compile(r"manifest\s*\[|manifest\.get\(|\[[\"'](artifacts|memory|generation|tokens|chat_template|"
                  r"context_length|tokenizer|weight_bytes|kv_bytes_per_token|vision_bytes_per_tile|activation_bytes|"
                  r"substitute_model|alternatives|context_capacity|max_context_len|data_files|methods|models|"
                  r"package|schema_version|eos_token_ids|image_seq_len)[\"']\]|json\.loads\([^)]*manifest")
_PACKAGES = ("runtime", "cloud_fallback", "benchmarks", "quantize", "export", "smoledge")
_SCHEMA_MODULES = {"runtime/manifest.py"}


def test_nothing_reads_a_raw_manifest_key_outside_the_schema_module():
    hits = []
    for package in _PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in _SCHEMA_MODULES or rel.startswith("runtime/js/"):
                continue  # runtime/js: the TypeScript package; its Python scripts write test vectors (tampered
                #           manifests on purpose, as tests/ does) and are no smoledge module
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _RAW.search(line.split("#")[0]):
                    hits.append(f"{rel}:{number}: {line.strip()}")
    assert hits == []


def test_the_session_check_sees_a_built_bundle_and_a_disagreement(tiny_int4_bundle, tmp_path):
    from schema_check import disagreements

    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "manifest.json").write_text((tiny_int4_bundle / "manifest.json").read_text())
    assert disagreements(tmp_path) == (1, [])
    data = _data(tiny_int4_bundle)
    data["artifacts"]["onnx"]["graphs"]["decoder"]["bytes"] = None  # both refuse: no disagreement
    data["artifacts"]["onnx"]["graphs"]["decoder"]["files"] = "x"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(data))
    assert disagreements(tmp_path) == (2, [])


def test_a_zips_file_table_is_checked_through_the_types_before_extraction():
    from smoledge.runtime.manifest import file_table

    assert file_table({"schema_version": 1, "files": {"a": {"sha256": "0" * 64, "size": 3}}}, "Z")["a"].size == 3
    with pytest.raises(BundleError, match=r"in Z has no valid 'files' table .*files\.a\.size: must be at least 0"):
        file_table({"files": {"a": {"sha256": "x", "size": -1}}}, "Z")
    with pytest.raises(BundleError, match="files: expected an object, got an array"):
        file_table({"files": []}, "Z")
