"""Export's last step before commit: measure each format's memory in child processes and write the figures.

The staged bundle gets a provisional manifest so the runtime can load it; every format that runs on
this machine is probed (:mod:`smoledge.runtime.memory_probe`), and the fitted figures go into
``memory.measured``.  A format that cannot run here (Core ML off macOS, ExecuTorch not installed) keeps
the formula only.  Measurements are cached in the smoledge cache dir, keyed by the manifest (minus its
date and memory section), the bundle's file hashes, the runtime's version, the probe code and the
machine, so re-exporting the same bundle does not measure again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import platform
import sys
from pathlib import Path

from smoledge.errors import SmolEdgeError
from smoledge.runtime.formats import format_spec
from smoledge.runtime.manifest import Manifest, MeasuredMemory

log = logging.getLogger(__name__)
_BUNDLE_MANIFEST = "manifest.json"


def with_measured_memory(staging, manifest: Manifest) -> Manifest:
    """``manifest`` with ``memory.measured`` for every format this machine runs (staging: a BundleStaging)."""
    staged = dataclasses.replace(manifest, files=staging._hash_files())
    (staging.staging / _BUNDLE_MANIFEST).write_text(json.dumps(staged.to_dict(), indent=2) + "\n")
    measured = {}
    for fmt in sorted(manifest.artifacts):
        if not format_spec(fmt).runs_here():
            continue
        try:
            measured[fmt] = _cached_measure(staging.staging, staged, fmt)
        except SmolEdgeError as err:  # the bundle still works; the router falls back to the formula
            log.warning("memory of the %s graphs not measured: %s", fmt, err.message)
    return dataclasses.replace(manifest, memory=dataclasses.replace(manifest.memory, measured=measured))


def _cached_measure(folder: Path, manifest: Manifest, fmt: str) -> MeasuredMemory:
    from smoledge.runtime.cache import cache_path
    from smoledge.runtime.memory_probe import measure_memory

    path = cache_path("memory") / f"{measurement_key(manifest, fmt)}.json"
    if path.is_file():
        try:
            return MeasuredMemory.from_dict(json.loads(path.read_text()), str(path))
        except (OSError, ValueError, SmolEdgeError):
            pass  # unreadable or from an older layout: measure again
    figures = measure_memory(folder, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(figures)) + "\n")
    tmp.replace(path)
    return figures


def measurement_key(manifest: Manifest, fmt: str) -> str:
    from smoledge.runtime import memory_probe

    data = manifest.to_dict()
    for volatile in ("created", "memory", "smoledge_version"):
        data.pop(volatile, None)
    # only this format's part: adding another format to the bundle keeps this one's measurement
    mine = {f for graph in manifest.artifacts[fmt].graphs.values() for f in graph.files} | {manifest.tokenizer.file}
    data.update(artifacts={fmt: dataclasses.asdict(manifest.artifacts[fmt])},
                files={path: dataclasses.asdict(entry) for path, entry in manifest.files.items() if path in mine})
    spec = format_spec(fmt)
    versions = {package: _version(package) for package in (*spec.requires, "numpy", "tokenizers")}
    # the probe's code and the backend's: a change in how the backend allocates must measure again
    backend = importlib.util.find_spec(spec.backend)
    code = Path(memory_probe.__file__).read_bytes() + (Path(backend.origin).read_bytes() if backend else b"")
    probe_code = hashlib.sha256(code).hexdigest()
    machine = [platform.machine(), platform.system(), sys.version.split()[0]]
    text = json.dumps([fmt, data, versions, probe_code, machine], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"
