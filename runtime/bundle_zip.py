"""Zip bundles: read the manifest first, extract what it lists (size-capped), atomically, once.

``extract_zip(path)`` returns a folder in the cache (``<cache>/bundles/<key>``, keyed by the zip's
path, size and mtime) holding the bundle.  The manifest inside the zip is read and checked before
anything is extracted: every entry must be a file the manifest lists, at the size it declares, so a
small zip claiming gigabytes is refused before it costs disk; each entry is copied with a cap at its
declared size (a lying zip header cannot write more).  Extraction goes to a private
``.<key>.partial-<pid>-*`` folder renamed into place at the end, so an interrupted extraction or two
processes opening one zip at once never see a half-written bundle; leftovers of dead processes are
removed on the next open.  A sidecar ``<key>.source.json`` remembers which zip a folder came from,
so ``smoledge cache prune`` can drop copies whose zip is gone or changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from smoledge.errors import BundleError
from smoledge.runtime.cache import process_alive

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_CHUNK = 1 << 20


def zip_cache() -> Path:
    from smoledge.runtime.cache import cache_path

    return cache_path("bundles")


def extract_zip(path: Path) -> Path:
    """The cache folder holding the bundle in ``path`` (extracted now unless already there)."""
    path = Path(path)
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = zip_cache()
    target = root / key
    if (target / MANIFEST).is_file():
        return target
    try:
        with zipfile.ZipFile(path) as zf:
            plan = _plan(zf, path)
            root.mkdir(parents=True, exist_ok=True)
            remove_dead_partials(root)
            _check_space(root, sum(size for _, _, size in plan), path)
            partial = Path(tempfile.mkdtemp(prefix=f".{key}.partial-{os.getpid()}-", dir=root))
            try:
                for info, rel, size in plan:
                    _copy_capped(zf, info, partial / rel, size, path)
                _publish(partial, target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    except zipfile.BadZipFile as err:
        raise BundleError(f"bundle zip {path} is corrupt ({err})", hint="re-copy or re-export it") from None
    except OSError as err:
        raise _disk_error(err, root, path) from None
    _write_source(root / f"{key}.source.json", path, st)
    return target


def _plan(zf: zipfile.ZipFile, path: Path) -> list[tuple[zipfile.ZipInfo, str, int]]:
    """``[(entry, relative path, declared size)]`` to extract, after checking the manifest."""
    infos = [i for i in zf.infolist() if not i.is_dir()]
    for info in infos:
        parts = PurePosixPath(info.filename).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename.split("/")[0]:
            raise BundleError(f"bundle zip {path} has an unsafe entry {info.filename!r}", hint="re-export it")
    names = {i.filename: i for i in infos}
    prefix = "" if MANIFEST in names else _single_root(names)
    mentry = names.get(prefix + MANIFEST)
    if mentry is None:
        raise BundleError(f"bundle zip {path} holds no {MANIFEST}", hint="zip the folder 'smoledge export' wrote")
    files = _declared_files(zf, mentry, path)
    plan = [(mentry, MANIFEST, mentry.file_size)]
    for name, info in names.items():
        rel = name[len(prefix):] if name.startswith(prefix) else None
        if rel == MANIFEST:
            continue
        if rel not in files:
            raise BundleError(f"bundle zip {path} holds {name!r}, which its manifest does not list",
                              hint="re-export the bundle (smoledge export --zip)")
        if info.file_size != files[rel]:
            raise BundleError(f"bundle zip {path}: {rel} unpacks to {info.file_size} bytes, the manifest says "
                              f"{files[rel]}", hint="re-copy or re-export it")
        plan.append((info, rel, files[rel]))
    return plan


def _single_root(names: dict) -> str:
    tops = {n.split("/", 1)[0] for n in names}
    return f"{tops.pop()}/" if len(tops) == 1 and all("/" in n for n in names) else ""


def _declared_files(zf: zipfile.ZipFile, mentry: zipfile.ZipInfo, path: Path) -> dict[str, int]:
    if mentry.file_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"the manifest in bundle zip {path} is {mentry.file_size} bytes; that is no manifest",
                          hint="re-export the bundle")
    try:
        with zf.open(mentry) as fh:
            manifest = json.loads(fh.read(MAX_MANIFEST_BYTES + 1))
    except (UnicodeDecodeError, ValueError) as err:
        raise BundleError(f"the manifest in bundle zip {path} is unreadable ({err})", hint="re-export it") from None
    from smoledge.runtime.manifest import file_table

    return {rel: entry.size for rel, entry in file_table(manifest, f"bundle zip {path}").items()}


def _check_space(root: Path, needed: int, path: Path) -> None:
    free = shutil.disk_usage(root).free
    if needed > free:
        raise BundleError(f"bundle zip {path} unpacks to {needed / 2**20:.0f} MiB but the cache at {root} has only "
                          f"{free / 2**20:.0f} MiB free", hint="free space (smoledge cache prune), or set "
                          "SMOLEDGE_CACHE_DIR to a bigger disk, or unzip it yourself and pass the folder")


def _copy_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, size: int, path: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(info) as src, open(dest, "wb") as out:
        while block := src.read(min(_CHUNK, size - written + 1)):
            written += len(block)
            if written > size:
                raise BundleError(f"bundle zip {path}: {info.filename} holds more than the {size} bytes it "
                                  "declares", hint="the zip is corrupt or crafted; re-export it")
            out.write(block)


def _publish(partial: Path, target: Path) -> None:
    """Rename the finished folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(partial, target)
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if (target / MANIFEST).is_file():
        return
    shutil.rmtree(target, ignore_errors=True)  # an incomplete folder left by an older smoledge
    os.rename(partial, target)


def remove_dead_partials(root: Path) -> list[Path]:
    """Remove ``.*.partial-<pid>-*`` folders whose process is gone; returns what was removed."""
    removed = []
    for stale in [*root.glob(".*.partial-*"), *root.glob("*.partial")]:  # (the second: older smoledge)
        pid = stale.name.split(".partial-", 1)[1].split("-", 1)[0] if ".partial-" in stale.name else ""
        if pid.isdigit() and process_alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    return removed


def _write_source(sidecar: Path, path: Path, st: os.stat_result) -> None:
    try:
        tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"zip": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
        os.replace(tmp, sidecar)
    except OSError:
        pass  # only `smoledge cache prune` reads it


def _disk_error(err: OSError, root: Path, path: Path) -> BundleError:
    if err.errno == errno.ENOSPC:
        return BundleError(f"the disk holding the cache ({root}) is full; bundle zip {path} cannot be extracted",
                           hint="free space (smoledge cache prune), or set SMOLEDGE_CACHE_DIR to a bigger disk")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return BundleError(f"the cache ({root}) is not writable, so bundle zip {path} cannot be extracted",
                           hint="set SMOLEDGE_CACHE_DIR to a writable folder, or unzip it yourself and pass "
                           "the folder")
    return BundleError(f"bundle zip {path} cannot be extracted into {root}: {err.strerror or err}",
                       hint="check the cache folder, or unzip it yourself and pass the folder")
