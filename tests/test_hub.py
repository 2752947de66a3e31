"""`smoledge pull` and `smoledge run HUB_ID` from a pre-populated Hugging Face cache, offline (HF_HUB_OFFLINE=1).

The cache is laid out as huggingface_hub writes it: ``models--owner--name/blobs/<sha256>``,
``snapshots/<commit>/<path>`` symlinks into the blobs, ``refs/<branch>`` holding the commit.  No test here
reaches the network (push is documented in docs/hub.md, not tested: faking the Hub's commit API would test
the fake).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import PARIS_QUESTION, run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def populate(hub_cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, branch: str = "main") -> Path:
    """Put ``folder``'s files into ``hub_cache`` as the snapshot ``commit`` of ``repo_id`` (ref ``branch``)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """An empty smoledge cache and an offline Hub cache for this test (in this process and its children)."""
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "SMOLEDGE_CACHE_DIR": str(tmp_path / "se")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", env["HF_HUB_CACHE"])  # read at import; the env covers subprocesses
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_pull_links_the_bundle_out_of_the_hub_cache_and_verifies_it(tiny_int4_bundle, offline):
    from smoledge.runtime.bundle import open_bundle

    populate(offline / "hub", "smoledge-test/tiny-int4", tiny_int4_bundle)
    res = run_cli("pull", "smoledge-test/tiny-int4")
    assert res.returncode == 0, res.stderr
    pulled = Path(res.stdout.strip())
    assert pulled == offline / "se" / "hub" / "smoledge-test--tiny-int4" / COMMIT
    assert not any(p.is_symlink() for p in pulled.rglob("*"))  # real files: the runtime refuses links out
    assert open_bundle(pulled, verify="full").manifest.files == open_bundle(tiny_int4_bundle).manifest.files
    again = run_cli("pull", "smoledge-test/tiny-int4")
    assert again.returncode == 0 and again.stdout == res.stdout


def test_pull_a_revision(tiny_int4_bundle, tiny_fp32_bundle, offline):
    from smoledge.hub import pull

    populate(offline / "hub", "smoledge-test/tiny", tiny_int4_bundle)
    populate(offline / "hub", "smoledge-test/tiny", tiny_fp32_bundle, OTHER_COMMIT, branch="fp32")
    assert pull("smoledge-test/tiny").name == COMMIT
    fp32 = pull("smoledge-test/tiny", "fp32")
    assert fp32.name == OTHER_COMMIT
    assert json.loads((fp32 / "manifest.json").read_text()) == json.loads(
        (tiny_fp32_bundle / "manifest.json").read_text())


def test_a_corrupt_download_is_refused_and_nothing_is_kept(tiny_int4_bundle, offline):
    snapshot = populate(offline / "hub", "smoledge-test/tiny-int4", tiny_int4_bundle)
    blob = (snapshot / "tokenizer.json").resolve()
    data = bytearray(blob.read_bytes())
    data[10] ^= 1  # same size, other bytes: only the sha256 can tell
    blob.write_bytes(bytes(data))
    res = run_cli("pull", "smoledge-test/tiny-int4")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "does not match its manifest" in res.stderr and "tokenizer.json" in res.stderr
    kept = offline / "se" / "hub" / "smoledge-test--tiny-int4"
    assert not kept.exists() or not any(kept.iterdir())


def test_pull_of_a_missing_repo_offline_is_one_line(offline):
    res = run_cli("pull", "smoledge-test/nothing-here")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "not in the local Hugging Face cache" in res.stderr and "HF_HUB_OFFLINE" in res.stderr


def test_run_of_a_path_that_is_not_there_names_both_readings(offline):
    res = run_cli("run", "bundles/typo", "hi", "--no-cloud")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "no bundle or model folder at bundles/typo" in res.stderr and "Hugging Face cache" in res.stderr


def test_pull_of_a_model_repo_says_to_run_it(tiny_model_dir, offline):
    populate(offline / "hub", "smoledge-test/tiny-model", tiny_model_dir)
    res = run_cli("pull", "smoledge-test/tiny-model")
    assert res.returncode != 0 and "holds no smoledge bundle" in res.stderr, res.stderr


def test_run_a_hub_bundle_pulls_it_and_answers(tiny_int4_bundle, offline):
    populate(offline / "hub", "smoledge-test/tiny-int4", tiny_int4_bundle)
    res = run_cli("run", "smoledge-test/tiny-int4", PARIS_QUESTION, "--temperature", "0", "--max-new-tokens", "6",
                  "--no-cloud")
    local = run_cli("run", str(tiny_int4_bundle), PARIS_QUESTION, "--temperature", "0", "--max-new-tokens", "6",
                    "--no-cloud")
    assert res.returncode == 0 and local.returncode == 0, res.stderr + local.stderr
    assert res.stdout == local.stdout and "exporting" not in res.stderr
    assert (offline / "se" / "hub" / "smoledge-test--tiny-int4" / COMMIT / "manifest.json").is_file()
    assert not (offline / "se" / "exports").exists()


@pytest.mark.slow
def test_run_a_hub_model_exports_it_once(tiny_model_dir, offline):
    """A repo holding a checkpoint (config.json, no manifest.json) is exported into the cache, not pulled."""
    from smoledge.runtime.bundle import open_bundle

    populate(offline / "hub", "smoledge-test/tiny-model", tiny_model_dir)
    argv = ("run", "smoledge-test/tiny-model", "hi", "--temperature", "0", "--max-new-tokens", "4", "--no-cloud")
    first = run_cli(*argv)
    assert first.returncode == 0 and "exporting smoledge-test/tiny-model once" in first.stderr, first.stderr
    (bundle,) = (offline / "se" / "exports").iterdir()
    source = open_bundle(bundle).manifest.source
    assert (source.model_id, source.revision) == ("smoledge-test/tiny-model", COMMIT)
    second = run_cli(*argv)
    assert second.returncode == 0 and "exporting" not in second.stderr and second.stdout == first.stdout
    assert not (offline / "se" / "hub").exists()
