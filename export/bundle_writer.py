"""Write a bundle atomically: build in a staging folder beside the target, then swap it in.

An interrupted (even killed) export leaves at most hidden ``.NAME.staging-<pid>``, ``.NAME.old-<pid>``
and ``.smoledge-<format>-<pid>-*`` scratch folders; the next export beside it removes those whose process
is gone (``smoledge cache`` lists them too), never a live export's.  Nothing is written into an
existing bundle before the swap: exporting another format into it hard-links its files into staging
(free), and every file a target writes is first unlinked in staging (``path()``), so a write never goes
through a link into the old, valid bundle.  ``write_zip`` writes the ``.zip`` form the runtime opens.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from pathlib import Path

from smoledge.errors import ExportError
from smoledge.runtime.bundle import MANIFEST, open_bundle, read_manifest, sha256_file
from smoledge.runtime.cache import process_alive
from smoledge.runtime.manifest import FileEntry, Manifest


class BundleStaging:
    def __init__(self, out: Path, source_files: dict[str, str]):
        self.out = Path(out)
        self.staging = self.out.parent / f".{self.out.name}.staging-{os.getpid()}"
        self.previous: Manifest | None = None
        self._source_files = source_files

    def __enter__(self) -> "BundleStaging":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.out.parent)
            if self.out.exists():
                self.previous = self._existing_manifest()
                shutil.copytree(self.out, self.staging, copy_function=_link_or_copy)
            else:
                self.staging.mkdir()
        except OSError as err:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise _write_error(self.out, err) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def _existing_manifest(self) -> Manifest | None:
        if not self.out.is_dir() or (not (self.out / MANIFEST).is_file() and any(self.out.iterdir())):
            raise ExportError(f"{self.out} exists and is not a smoledge bundle", hint="choose a new or empty --out")
        if not (self.out / MANIFEST).is_file():
            return None
        manifest = read_manifest(self.out)
        if manifest.source.files != self._source_files:
            raise ExportError(f"the bundle at {self.out} was exported from another checkpoint "
                              f"({manifest.source.model_id})", hint="export into a new --out folder")
        return manifest

    def path(self, relative: str) -> Path:
        """Where to write ``relative`` in staging; a linked copy there (and its ``.data`` siblings) is
        unlinked first, so the write makes a new file instead of changing the old bundle's."""
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        for old in (target, *target.parent.glob(f"{glob.escape(target.name)}.*")):
            if old.is_file() or old.is_symlink():
                old.unlink()
        return target

    def clear_format(self, relative_dir: str) -> None:
        """Remove a format's old files before it is written again."""
        shutil.rmtree(self.staging / relative_dir, ignore_errors=True)

    def commit(self, manifest: Manifest) -> Path:
        manifest = dataclasses.replace(manifest, files=self._hash_files())
        _write_json(self.staging / MANIFEST, manifest.to_dict())
        open_bundle(self.staging, verify=False).verify(full=False)
        backup = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        try:
            if self.out.exists():
                os.replace(self.out, backup)
            os.replace(self.staging, self.out)
        except OSError as err:
            if backup.exists() and not self.out.exists():
                os.replace(backup, self.out)
            raise _write_error(self.out, err) from None
        shutil.rmtree(backup, ignore_errors=True)
        return self.out

    def _hash_files(self) -> dict[str, FileEntry]:
        files = {}
        for path in sorted(self.staging.rglob("*")):
            rel = path.relative_to(self.staging).as_posix()
            if path.is_file() and rel != MANIFEST:
                files[rel] = FileEntry(sha256_file(path), path.stat().st_size)
        return files


def scratch_prefix(fmt: str) -> str:
    """The name prefix of a target's scratch folder beside the bundle (pid inside: leftovers are found)."""
    return f".smoledge-{fmt}-{os.getpid()}-"


_LEFTOVERS = (".*.staging-*", ".*.old-*", ".smoledge-*-*-*")


def leftovers(folder: Path) -> list[Path]:
    """Staging and scratch folders in ``folder`` left by exports whose process is gone."""
    found = []
    for pattern in _LEFTOVERS:
        for path in Path(folder).glob(pattern):
            pid = _pid_in(path.name)
            if path.is_dir() and pid is not None and not process_alive(pid):
                found.append(path)
    return found


def remove_leftovers(folder: Path) -> list[Path]:
    removed = leftovers(folder)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _pid_in(name: str) -> int | None:
    for marker in (".staging-", ".old-"):
        if marker in name:
            tail = name.rsplit(marker, 1)[1]
            return int(tail) if tail.isdigit() else None
    parts = name.split("-")  # .smoledge-<format>-<pid>-<random>
    return int(parts[2]) if name.startswith(".smoledge-") and len(parts) >= 4 and parts[2].isdigit() else None




def _write_error(out: Path, err: OSError) -> ExportError:
    import errno

    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ExportError(f"cannot write the bundle at {out}: {err.strerror or err}",
                           hint="choose a writable --out folder")
    if err.errno == errno.ENOSPC:
        return ExportError(f"the disk is full while writing the bundle at {out}",
                           hint="free space or use another --out")
    return ExportError(f"cannot write the bundle at {out}: {err.strerror or err}", hint="check the --out folder")


def write_zip(bundle: Path, zip_path: Path | None = None) -> Path:
    """Zip a finished bundle folder (manifest first, weights stored uncompressed) atomically beside it."""
    import zipfile

    bundle = Path(bundle)
    zip_path = Path(zip_path) if zip_path is not None else bundle.with_name(bundle.name + ".zip")
    files = sorted(open_bundle(bundle, verify=False).manifest.files)
    tmp = zip_path.with_name(f".{zip_path.name}.staging-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            for rel in (MANIFEST, *files):
                packed = zipfile.ZIP_DEFLATED if rel.endswith((".json", ".txt", ".jinja")) else zipfile.ZIP_STORED
                zf.write(bundle / rel, rel, compress_type=packed)
        os.replace(tmp, zip_path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(zip_path, err) from None
    return zip_path


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
