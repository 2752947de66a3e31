"""The bundle: the only contract between export and runtime.

A bundle is a folder (or a ``.zip`` of one) holding ``manifest.json``, ``tokenizer.json`` and the
artifacts of one or more formats.  The manifest says everything the runtime needs; nothing is parsed
from file names.  Its schema is the types of :mod:`smoledge.runtime.manifest` (published as
``manifest.schema.json``); :func:`read_manifest` checks a bundle's manifest against them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from smoledge.errors import BundleError
from smoledge.runtime.manifest import SCHEMA_VERSION, Artifact, Manifest

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Bundle", "open_bundle", "read_manifest", "sha256_file"]
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def formats(self) -> list[str]:
        return self.manifest.formats

    def file(self, relative: str) -> Path:
        """The path of a file the manifest lists (never anything outside the bundle)."""
        if relative not in self.manifest.files:
            raise BundleError(f"bundle {self.path} lists no file {relative!r}", hint="re-export the bundle")
        resolved = (self.path / relative).resolve()
        if self.path.resolve() not in resolved.parents:
            raise BundleError(f"bundle {self.path} points outside itself ({relative!r})",
                              hint="the manifest was tampered with; re-export the bundle")
        return resolved

    def artifact(self, fmt: str) -> Artifact:
        try:
            return self.manifest.artifacts[fmt]
        except KeyError:
            raise BundleError(f"bundle {self.path} has no {fmt} artifacts (it has: {', '.join(self.formats)})",
                              hint=f"export them with: smoledge export MODEL --format {fmt} --out {self.path}") from None

    def verify(self, *, full: bool = True) -> list[str]:
        """Check every listed file: present, right size and (``full``) right sha256.  Raises on the first
        problem; returns the files checked."""
        checked = []
        for rel, meta in sorted(self.manifest.files.items()):
            path = self.file(rel)
            if not path.is_file():
                raise BundleError(f"bundle {self.path} is missing {rel}", hint="re-export the bundle")
            size = path.stat().st_size
            if size != meta.size:
                raise BundleError(f"{rel} in bundle {self.path} is {size} bytes, the manifest says {meta.size} "
                                  "(truncated or replaced)", hint="re-export or re-copy the bundle")
            if full and sha256_file(path) != meta.sha256:
                raise BundleError(f"{rel} in bundle {self.path} does not match its sha256 (tampered or corrupt)",
                                  hint="re-export or re-copy the bundle")
            checked.append(rel)
        return checked


def open_bundle(path: str | Path, *, verify: bool | str = True) -> Bundle:
    """Open a bundle folder (or ``.zip``), check its manifest schema and, by default, its files.

    ``verify``: True / ``"fast"`` hashes only files whose size or mtime changed since the last check,
    ``"full"`` hashes every file (bit rot, or a file changed with its mtime restored), False none."""
    path = Path(path).expanduser()
    if path.is_file() and zipfile.is_zipfile(path):
        from smoledge.runtime.bundle_zip import extract_zip

        path = extract_zip(path)
    if not path.exists():
        raise BundleError(f"no bundle at {path}", hint="give the folder written by 'smoledge export'")
    manifest = read_manifest(path)
    bundle = Bundle(path, manifest)
    if verify == "full":
        bundle.verify(full=True)
    elif verify:
        _verify_cached(bundle)
    return bundle


def read_manifest(path: Path) -> Manifest:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path} is not a smoledge bundle (no {MANIFEST})",
                          hint="give the folder written by 'smoledge export'")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"the manifest of {path} is unreadable ({err})", hint="re-export the bundle") from None
    return Manifest.from_dict(manifest, str(path))


def _verify_cached(bundle: Bundle) -> None:
    """Full sha256 check, skipped for files whose size and mtime are unchanged since the last full check
    of this bundle (``smoledge bundle verify`` always hashes everything)."""
    from smoledge.runtime.cache import cache_path

    key_name = hashlib.sha256(str(bundle.path.resolve()).encode()).hexdigest()[:16]
    stamp_path = cache_path("verified") / f"{key_name}.json"
    stamps = {}
    try:
        stamps = json.loads(stamp_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    if not isinstance(stamps, dict):  # a corrupt stamp file only means: hash everything again
        stamps = {}
    fresh, changed = {}, False
    for rel, meta in bundle.manifest.files.items():
        path = bundle.file(rel)
        try:
            st = path.stat()
        except OSError:
            raise BundleError(f"bundle {bundle.path} is missing {rel}", hint="re-export the bundle") from None
        key = [meta.sha256, st.st_size, st.st_mtime_ns]
        if stamps.get(rel) != key:
            Bundle(bundle.path, dataclasses.replace(bundle.manifest, files={rel: meta})).verify(full=True)
            changed = True
        fresh[rel] = key
    if changed or set(stamps) != set(fresh):
        try:
            stamp_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = stamp_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, stamp_path)
        except OSError:
            pass  # without a writable cache, the bundle is verified in full every time
