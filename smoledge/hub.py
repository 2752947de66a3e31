"""``smoledge push BUNDLE REPO_ID`` and ``smoledge pull REPO_ID [--revision R]``: pre-built bundles on the Hugging
Face Hub, so a small device pulls what a bigger machine exported (as the GGUF repos are used).

Both go through huggingface_hub: ``upload_folder`` and ``snapshot_download``, its cache (``HF_HOME`` /
``HF_HUB_CACHE``), ``HF_TOKEN`` and ``HF_HUB_OFFLINE``.  A bundle repo holds the bundle's files at its root,
``manifest.json`` first among them.  A pulled bundle is hard-linked (or copied) out of the Hub cache into
``<smoledge cache>/hub/<owner>--<name>/<commit>`` - the Hub cache's symlinks point outside the bundle, which the
runtime refuses - and verified in full against its manifest before it is used; a pull of a commit already
there only checks sizes and mtimes.  See docs/hub.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from smoledge.errors import BundleError, ConfigError, ModelLoadError

MANIFEST = "manifest.json"


def probe(repo_id: str, revision: str | None) -> tuple[str, Path]:
    """("bundle" | "model", the snapshot folder) for a Hub repo: a bundle has manifest.json at its root, a
    model config.json (only those two files are fetched)."""
    from smoledge.export.loader import hub_snapshot

    snapshot = hub_snapshot(repo_id, revision, [MANIFEST, "config.json"], kind="repo")
    if (snapshot / MANIFEST).is_file():
        return "bundle", snapshot
    if (snapshot / "config.json").is_file():
        return "model", snapshot
    raise ModelLoadError(f"Hub repo {repo_id} holds neither a smoledge bundle (manifest.json) nor a model "
                         "(config.json)", hint="check the id and --revision")


def pull(repo_id: str, revision: str | None = None) -> Path:
    """The bundle in Hub repo ``repo_id``, downloaded once and verified against its manifest."""
    from smoledge.export.loader import hub_snapshot
    from smoledge.runtime.bundle import open_bundle
    from smoledge.runtime.cache import cache_path

    head = hub_snapshot(repo_id, revision, [MANIFEST], kind="bundle")
    files = _listed_files(head, repo_id)
    dest = cache_path("hub") / repo_id.replace("/", "--") / head.name  # the snapshot is named by its commit
    if (dest / MANIFEST).is_file():
        return open_bundle(dest, verify=True).path
    snapshot = hub_snapshot(repo_id, head.name, [MANIFEST, *files], kind="bundle")
    _materialize(snapshot, [MANIFEST, *files], dest, repo_id)
    return dest


def _listed_files(snapshot: Path, repo_id: str) -> list[str]:
    from smoledge.runtime.manifest import file_table

    try:
        data = json.loads((snapshot / MANIFEST).read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"Hub repo {repo_id} holds no smoledge bundle (no {MANIFEST} at its root)",
                             hint="'smoledge run REPO_ID' exports a model repo; pull is for bundle repos") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"the manifest in Hub repo {repo_id} is unreadable ({err})",
                          hint="push the bundle again") from None
    return sorted(file_table(data, f"Hub repo {repo_id}"))


def _materialize(snapshot: Path, files: list[str], dest: Path, repo_id: str) -> None:
    """Link the snapshot's files into ``dest`` through a staging folder, verified in full before the swap."""
    from smoledge.export.bundle_writer import remove_leftovers
    from smoledge.runtime.bundle import open_bundle

    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest.parent)
    staging = dest.with_name(f".{dest.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for rel in files:
            source = (snapshot / rel).resolve()
            if not source.is_file():
                raise BundleError(f"the bundle in Hub repo {repo_id} is missing {rel}",
                                  hint="push the bundle again (all of its files)")
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        try:
            open_bundle(staging, verify="full")
        except BundleError as err:
            raise BundleError(f"the bundle pulled from {repo_id} does not match its manifest: {err.message}",
                              hint="pull again; if it persists, push the bundle again") from None
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def push(bundle: str | Path, repo_id: str, *, private: bool = False, branch: str | None = None,
         message: str | None = None) -> str:
    """Upload a bundle (folder or .zip; verified in full first) to Hub repo ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    from smoledge.runtime.bundle import open_bundle

    local = open_bundle(bundle, verify="full")
    m = local.manifest
    api = HfApi()  # HF_TOKEN / the saved login, HF_ENDPOINT
    text = message or f"smoledge bundle of {m.source.model_id} ({', '.join(m.formats)}, smoledge {m.smoledge_version})"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=local.path, allow_patterns=[MANIFEST, *m.files],
                                 commit_message=text, revision=branch)
    except hf_errors.HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise ConfigError(f"no write access to Hub repo {repo_id} (HTTP {status})",
                              hint="set HF_TOKEN to a token with write access, or run 'hf auth login'") from None
        raise ModelLoadError(f"could not push to Hub repo {repo_id}: {err}", hint="check the network and HF_TOKEN")\
            from None
    except OSError as err:
        raise ModelLoadError(f"could not push to Hub repo {repo_id}: {err}", hint="check the network") from None
    return str(getattr(info, "commit_url", None) or info)
