"""Write a bundle atomically: build in a staging folder beside the target, then swap it in.

An interrupted export leaves at most a hidden ``.NAME.staging-*`` folder (removed on the next export),
never a folder that looks like a valid bundle.  Exporting another format into an existing bundle of the
same checkpoint copies it into staging first, so the old bundle stays valid until the swap.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from smoledge.errors import ExportError
from smoledge.runtime.bundle import MANIFEST, open_bundle, read_manifest, sha256_file


class BundleStaging:
    def __init__(self, out: Path, source_files: dict[str, str]):
        self.out = Path(out)
        self.staging = self.out.parent / f".{self.out.name}.staging-{os.getpid()}"
        self.previous: dict | None = None
        self._source_files = source_files

    def __enter__(self) -> "BundleStaging":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.out.parent.glob(f".{self.out.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.out.exists():
            self.previous = self._existing_manifest()
            shutil.copytree(self.out, self.staging, copy_function=_link_or_copy)
        else:
            self.staging.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def _existing_manifest(self) -> dict:
        if not self.out.is_dir() or (not (self.out / MANIFEST).is_file() and any(self.out.iterdir())):
            raise ExportError(f"{self.out} exists and is not a smoledge bundle", hint="choose a new or empty --out")
        if not (self.out / MANIFEST).is_file():
            return {}
        manifest = read_manifest(self.out)
        if manifest["source"].get("files") != self._source_files:
            raise ExportError(f"the bundle at {self.out} was exported from another checkpoint "
                              f"({manifest['source'].get('model_id')})", hint="export into a new --out folder")
        return manifest

    def path(self, relative: str) -> Path:
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def clear_format(self, relative_dir: str) -> None:
        """Remove a format's old files before it is written again."""
        shutil.rmtree(self.staging / relative_dir, ignore_errors=True)

    def commit(self, manifest: dict) -> Path:
        manifest = dict(manifest)
        manifest["files"] = self._hash_files()
        _write_json(self.staging / MANIFEST, manifest)
        open_bundle(self.staging, verify=False).verify(full=False)
        backup = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        if self.out.exists():
            os.replace(self.out, backup)
        os.replace(self.staging, self.out)
        shutil.rmtree(backup, ignore_errors=True)
        return self.out

    def _hash_files(self) -> dict:
        files = {}
        for path in sorted(self.staging.rglob("*")):
            rel = path.relative_to(self.staging).as_posix()
            if path.is_file() and rel != MANIFEST:
                files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        return files


def _link_or_copy(src, dst):
    """Hard links make the copy free; files are only ever replaced, never modified in place."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
