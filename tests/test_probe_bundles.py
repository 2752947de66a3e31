"""Issue 17's hostile probe against bundles on disk, kept as tests: zip bundles (D7), killed and overlapping
exports (D8, D9), the `--zip` writer, a read-only `--out` (D13) and `smoledge cache`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from smoledge.cli import main
from smoledge.errors import BundleError
from smoledge.export.bundle_writer import BundleStaging, write_zip
from smoledge.runtime.bundle import open_bundle
from smoledge.runtime.bundle_zip import extract_zip

DEAD_PID = 4_194_305  # above the largest pid_max Linux allows: never a live process


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SMOLEDGE_CACHE_DIR", str(root))
    return root


@pytest.fixture
def bundle_zip(tiny_int4_bundle, tmp_path) -> Path:
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_int4_bundle, folder)
    return write_zip(folder)


def _one_line(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_export_zip_writes_a_bundle_the_runtime_opens(bundle_zip, cache):
    with zipfile.ZipFile(bundle_zip) as zf:
        assert zf.namelist()[0] == "manifest.json"
    bundle = open_bundle(bundle_zip, verify="full")
    assert bundle.path.parent == cache / "bundles" and bundle.formats == ["onnx"]
    assert open_bundle(bundle_zip).path == bundle.path  # extracted once


def test_d7_leftovers_of_an_interrupted_extraction_do_not_block_the_next_open(bundle_zip, cache):
    first = extract_zip(bundle_zip)
    shutil.rmtree(first)
    (cache / "bundles" / f"{first.name}.partial" / "onnx").mkdir(parents=True)  # what older versions left
    dead = cache / "bundles" / f".{first.name}.partial-{DEAD_PID}-x"
    (dead / "onnx").mkdir(parents=True)
    assert (extract_zip(bundle_zip) / "manifest.json").is_file()
    assert not dead.exists() and not (cache / "bundles" / f"{first.name}.partial").exists()


def test_d7_two_processes_opening_one_zip_at_once_both_succeed(bundle_zip, cache):
    code = ("import sys; from smoledge.runtime.bundle import open_bundle; "
            "print(open_bundle(sys.argv[1], verify='full').path)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(bundle_zip)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=os.environ.copy()) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e.decode()[-500:] for _, e in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert not list((cache / "bundles").glob(".*.partial-*"))


def _crafted_zip(tmp_path: Path, declared: int, actual: int) -> Path:
    """A bundle zip whose manifest says weights.bin is ``declared`` bytes; the zip holds ``actual`` zeros."""
    path = tmp_path / "crafted.zip"
    manifest = {"schema_version": 1, "files": {"weights.bin": {"size": declared, "sha256": "0" * 64}}}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        with zf.open("weights.bin", "w", force_zip64=True) as fh:
            block = bytes(1 << 20)
            for _ in range(actual >> 20):
                fh.write(block)
    return path


def test_d7_a_zip_bomb_is_refused_before_anything_is_extracted(tmp_path, cache):
    bomb = _crafted_zip(tmp_path, declared=1000, actual=256 << 20)
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(BundleError, match="manifest says 1000"):
        open_bundle(bomb)
    leftovers = [p for p in (cache / "bundles").rglob("*")] if (cache / "bundles").exists() else []
    assert not [p for p in leftovers if p.is_file()], leftovers


def test_d7_entries_the_manifest_does_not_list_are_refused(tmp_path, cache):
    path = tmp_path / "extra.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"schema_version": 1, "files": {}}))
        zf.writestr("../../evil.sh", "echo hi")
    with pytest.raises(BundleError, match="unsafe entry"):
        open_bundle(path)


def test_d7_a_read_only_cache_is_a_one_line_error(bundle_zip, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMOLEDGE_CACHE_DIR", "/sys/smoledge-cache")  # sysfs refuses new folders, even to root
    _one_line(capsys, main(["run", str(bundle_zip), "--prompt", "hi", "--no-cloud"]), "not writable", str(bundle_zip))


def test_d8_a_killed_exports_leftovers_are_removed_by_the_next_export(tiny_int4_bundle, tmp_path):
    out = tmp_path / "bundle"
    dead = [tmp_path / f".smoledge-onnx-{DEAD_PID}-abc", tmp_path / f".bundle.staging-{DEAD_PID}",
            tmp_path / f".bundle.old-{DEAD_PID}"]
    live = tmp_path / f".smoledge-onnx-{os.getppid()}-abc"  # a live process's scratch: kept
    for folder in (*dead, live):
        (folder / "onnx").mkdir(parents=True)
        (folder / "onnx" / "graph.onnx.data").write_bytes(b"\0" * 1024)
    with BundleStaging(out, source_files={}):
        pass
    assert not any(p.exists() for p in dead) and live.exists()


def test_d9_a_write_in_staging_never_goes_through_to_the_existing_bundle(tiny_int4_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_int4_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    before = (out / "tokenizer.json").read_bytes()
    with BundleStaging(out, source_files=manifest["source"]["files"]) as staging:
        with open(staging.path("tokenizer.json"), "w") as fh:  # a writer truncating in place, as HF's does
            fh.write("{}")
        with open(staging.path("onnx/decoder_model_merged.onnx"), "wb") as fh:
            fh.write(b"new")
        assert (out / "tokenizer.json").read_bytes() == before  # killed here: the old bundle is intact
        assert not (staging.staging / "onnx" / "decoder_model_merged.onnx.data").exists()
    open_bundle(out, verify="full")


def test_d13_a_read_only_out_is_a_one_line_error(tiny_model_dir, capsys):
    rc = main(["export", str(tiny_model_dir), "--quant", "fp32", "--out", "/sys/smoledge-bundle", "--no-progress"])
    _one_line(capsys, rc, "not writable")


def test_cache_shows_and_prunes(bundle_zip, cache, capsys):
    open_bundle(bundle_zip)
    dead = cache / "bundles" / f".deadbeef.partial-{DEAD_PID}-x"
    dead.mkdir()
    (cache / "verified" / "corrupt.json").write_text("[1,2]")
    assert main(["cache"]) == 0
    shown = capsys.readouterr().out
    assert "extracted zips" in shown and "leftovers" in shown and "verify stamps" in shown, shown
    assert main(["cache", "prune", "--json"]) == 0
    removed = {Path(e["path"]).name for e in json.loads(capsys.readouterr().out)["removed"]}
    assert removed == {dead.name, "corrupt.json"}
    assert [e for e in (cache / "bundles").iterdir() if e.is_dir()]  # the live extracted copy stays
    bundle_zip.unlink()  # its zip is gone: the copy can never be used again
    assert main(["cache", "prune"]) == 0 and "removed extracted zips" in capsys.readouterr().out
    assert not [e for e in (cache / "bundles").iterdir() if e.is_dir()]
    assert main(["cache", "prune", "--all"]) == 0
    assert not list((cache / "verified").iterdir())
