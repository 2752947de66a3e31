"""``smoledge cache [--json]`` and ``smoledge cache prune [--all]``: what the smoledge cache holds.

The cache (``$SMOLEDGE_CACHE_DIR`` or the user cache dir) holds what is registered in
:data:`smoledge.runtime.cache.CACHE_ENTRIES` - built demo ``models/``, bundles exported by ``smoledge run
MODEL`` (``exports/``) or pulled from the Hub (``hub/``), bundles extracted from zips (``bundles/``),
verified-hash stamps (``verified/``), device ``calibration/``, export's ``memory/`` measurements, benchmark
builds (``bench/``), the test suite's ``test-bundles/`` and ``js-bundles/``, the cloud usage ledger and model
listing - and, after a crash, leftovers: half-extracted ``.partial`` folders and staging folders of dead
processes.  Each kind is listed with its size and what it is; anything else found there is listed as
``unknown`` (never hidden, never pruned).  ``prune`` removes what is safe to lose and cheap to rebuild:
leftovers, extracted copies whose zip is gone or changed, and corrupt stamps.  ``prune --all`` also
removes every extracted bundle and all stamps (re-made on the next run); it never removes anything else
(delete that by hand if you mean to).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from smoledge.runtime.cache import CACHE_ENTRIES

LEFTOVERS = "half-written folders of dead processes (smoledge cache prune removes them)"
UNKNOWN = "not written by this smoledge version (delete it by hand if it is not needed)"
# what each kind `smoledge cache` shows is, in the order shown
WHAT = {**{entry.kind: entry.what for entry in CACHE_ENTRIES}, "leftovers": LEFTOVERS, "unknown": UNKNOWN}
KINDS = tuple(WHAT)


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    size: int
    stale: bool = False  # prune removes it

    def to_json(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "bytes": self.size, "stale": self.stale}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["show", "prune"], default="show",
                        help="show (default) what the cache holds, or prune it")
    parser.add_argument("--all", action="store_true", help="with prune: also every extracted zip and stamp")
    parser.add_argument("--json", action="store_true", help="print JSON")


def scan(root: Path) -> list[Entry]:
    """Every registered cache entry found under ``root``, then anything else there (kind ``unknown``)."""
    entries: list[Entry] = []
    for registered in CACHE_ENTRIES:
        scanner = _SCANNERS.get(registered.name)
        if scanner is not None:
            entries += scanner(root / registered.name, registered.kind)
        elif registered.file:
            entries += [Entry(registered.kind, p, _size(p)) for p in sorted(root.glob(f"{registered.name}*"))]
        else:
            entries += [Entry(registered.kind, p, _size(p)) for p in _children(root / registered.name)]
    entries += [Entry("unknown", p, _size(p)) for p in _unregistered(root)]
    return entries


def _with_leftovers(folders: list[Path], kind: str) -> list[Entry]:
    """Bundles written through a staging folder: the dead writers' staging folders are leftovers."""
    from smoledge.export.bundle_writer import leftovers

    entries = []
    for folder in folders:
        dead = set(leftovers(folder))
        for path in _children(folder):
            stale = path in dead
            entries.append(Entry("leftovers" if stale else kind, path, _size(path), stale=stale))
    return entries


def _extracted(bundles: Path, kind: str) -> list[Entry]:
    from smoledge.export.bundle_writer import leftovers

    dead = set(leftovers(bundles)) | set(_dead_partials(bundles))
    entries = []
    for path in _children(bundles):
        if path.is_dir():
            left = path in dead or ".partial" in path.name
            entries.append(Entry("leftovers" if left else kind, path, _size(path), stale=left or _zip_gone(path)))
    return entries


def _stamps(folder: Path, kind: str) -> list[Entry]:
    return [Entry(kind, path, _size(path), stale=_stamp_gone(path)) for path in _children(folder)]


# the registered entries whose items need more than a listing (the others: every child, or name* files)
_SCANNERS = {
    "exports": lambda folder, kind: _with_leftovers([folder], kind),  # `smoledge run MODEL`'s exports
    "hub": lambda folder, kind: _with_leftovers(_children(folder), kind),  # <owner>--<name>/<commit>
    "bundles": _extracted,
    "verified": _stamps,
}


def _unregistered(root: Path) -> list[Path]:
    folders = {e.name for e in CACHE_ENTRIES if not e.file}
    files = tuple(e.name for e in CACHE_ENTRIES if e.file)
    try:
        found = sorted(root.iterdir())
    except OSError:
        return []
    return [p for p in found if p.name not in folders and not p.name.startswith(files)]


def prune(root: Path, *, everything: bool = False) -> list[Entry]:
    """Remove stale entries (``everything``: all extracted zips and stamps too); returns what went."""
    removed = []
    for entry in scan(root):
        if entry.stale or (everything and entry.kind in ("extracted zips", "verify stamps", "leftovers")):
            _remove(entry.path)
            sidecar = entry.path.with_name(f"{entry.path.name}.source.json")
            if entry.kind == "extracted zips" and sidecar.exists():
                sidecar.unlink()
            removed.append(entry)
    return removed


def main(args: argparse.Namespace) -> int:
    from smoledge.runtime.cache import cache_dir

    root = cache_dir()
    if args.action == "prune":
        removed = prune(root, everything=args.all)
        freed = sum(e.size for e in removed)
        if args.json:
            print(json.dumps({"removed": [e.to_json() for e in removed], "freed_bytes": freed}))
        else:
            for entry in removed:
                print(f"removed {entry.kind}: {entry.path} ({_human(entry.size)})")
            print(f"freed {_human(freed)} in {root}")
        return 0
    entries = scan(root)
    if args.json:
        print(json.dumps({"cache_dir": str(root), "entries": [e.to_json() for e in entries], "kinds": WHAT}))
        return 0
    print(f"smoledge cache: {root}")
    for kind in KINDS:
        mine = [e for e in entries if e.kind == kind]
        if mine:
            stale = sum(e.stale for e in mine)
            note = f", {stale} stale (smoledge cache prune)" if stale else ""
            print(f"  {kind:15} {len(mine):4} item(s) {_human(sum(e.size for e in mine)):>10}{note}  {WHAT[kind]}")
    if not entries:
        print("  (empty)")
    return 0


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.endswith((".source.json", ".tmp")))
    except OSError:
        return []


def _size(path: Path) -> int:
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def _dead_partials(folder: Path) -> list[Path]:
    from smoledge.runtime.cache import process_alive

    found = []
    for path in folder.glob(".*.partial-*"):
        pid = path.name.split(".partial-", 1)[1].split("-", 1)[0]
        if not (pid.isdigit() and process_alive(int(pid))):
            found.append(path)
    return found


def _zip_gone(path: Path) -> bool:
    """An extracted copy whose zip was deleted or changed since (the copy can never be used again)."""
    try:
        source = json.loads(path.with_name(f"{path.name}.source.json").read_text())
        st = Path(source["zip"]).stat()
        return (st.st_size, st.st_mtime_ns) != (source["size"], source["mtime_ns"])
    except (OSError, ValueError, KeyError, TypeError):
        return True


def _stamp_gone(path: Path) -> bool:
    try:
        stamps = json.loads(path.read_text())
        return not isinstance(stamps, dict)
    except (OSError, ValueError):
        return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
