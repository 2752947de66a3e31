"""Where smoledge keeps what it builds: ``$SMOLEDGE_CACHE_DIR`` or the user cache dir, and what it keeps there.

Every folder (or file) written directly under the cache is registered once in :data:`CACHE_ENTRIES`, with
the label and the one line ``smoledge cache`` shows for it; writers get their path from
:func:`cache_path`, which refuses a name that is not registered.  ``tests/test_cache_entries.py`` fails when
code writes under the cache without going through it, or when the listing misses a registered entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CacheEntry:
    """One thing at the top of the smoledge cache."""

    name: str  # the folder (or file) under the cache dir
    kind: str  # the label ``smoledge cache`` shows
    what: str  # what it holds and who writes it, one line
    file: bool = False  # a file at the top (and its ``name*`` siblings: a database's -wal / -shm), not a folder


CACHE_ENTRIES: tuple[CacheEntry, ...] = (
    CacheEntry("models", "models", "demo and test models built from configs (demo-model, make demo, the bench)"),
    CacheEntry("exports", "exports", "bundles `smoledge run MODEL` exported from a checkpoint"),
    CacheEntry("hub", "hub bundles", "bundles pulled from the Hub (`smoledge pull`, `smoledge run owner/name`)"),
    CacheEntry("bundles", "extracted zips", "zip bundles extracted to run (re-made on the next run)"),
    CacheEntry("verified", "verify stamps", "sizes and mtimes of bundle files already hashed (re-made on the next "
               "run)"),
    CacheEntry("calibration", "calibration", "`smoledge doctor --calibrate` records, per bundle, backend and device"),
    CacheEntry("quant", "quantization", "calibrated quantization results (GPTQ / importance grids) per weight group, "
               "keyed by weights, scheme and calibration, reused by the next export"),
    CacheEntry("memory", "memory", "peak-memory measurements of export, reused when the same bundle is exported "
               "again"),
    CacheEntry("bench", "bench", "benchmark models and bundles (`smoledge bench`, make bench-full)"),
    CacheEntry("test-bundles", "test bundles", "ExecuTorch bundles of the test suite, keyed by what they are built "
               "from"),
    CacheEntry("js-bundles", "js bundles", "bundles and test vectors of the JS runtime's tests"),
    CacheEntry("arm64", "arm64", "scripts/check_arm64.sh: its arm64 environment and last run"),
    CacheEntry("cloud_ledger.sqlite", "ledger", "the cloud usage ledger (`smoledge usage`): calls, tokens, spend",
               file=True),
    CacheEntry("cloud_models.json", "cloud models", "the cloud router's model listing (prices, context windows), "
               "reused for an hour", file=True),
)
_BY_NAME = {entry.name: entry for entry in CACHE_ENTRIES}


def cache_dir() -> Path:
    env = os.environ.get("SMOLEDGE_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("smoledge"))


def cache_path(name: str, root: str | Path | None = None) -> Path:
    """``<cache>/<name>`` for a registered ``name`` (``root``: a cache dir given by the caller, else
    :func:`cache_dir`).  A name missing from :data:`CACHE_ENTRIES` is a bug: register it there first."""
    if name not in _BY_NAME:
        raise ValueError(f"{name!r} is not a registered smoledge cache entry: add it to "
                         "smoledge.runtime.cache.CACHE_ENTRIES (with what it holds) before writing it")
    return (cache_dir() if root is None else Path(root)) / name


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (this one counts): staging and extraction folders carry their
    writer's pid, and only a dead writer's leftovers may be removed."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
