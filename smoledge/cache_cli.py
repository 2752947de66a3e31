"""``smoledge cache [--json]`` and ``smoledge cache prune [--all]``: what the smoledge cache holds.

The cache (``$SMOLEDGE_CACHE_DIR`` or the user cache dir) holds built demo ``models/``, bundles
exported by ``smoledge run MODEL`` (``exports/``) or pulled from the Hub (``hub/``), bundles extracted
from zips (``bundles/``), verified-hash stamps (``verified/``), device ``calibration/``,
benchmark builds (``bench/``), the cloud usage ledger, and - after a crash - leftovers: half-extracted
``.partial`` folders and staging folders of dead processes.  ``prune`` removes what is safe to lose
and cheap to rebuild: leftovers, extracted copies whose zip is gone or changed, and corrupt stamps.
``prune --all`` also removes every extracted bundle and all stamps (re-made on the next run); it never
removes models, exports, pulled bundles, calibration or the usage ledger (delete those by hand if you mean to).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

KINDS = ("models", "exports", "hub bundles", "bundles", "extracted zips", "verify stamps", "calibration", "bench", "ledger", "leftovers")


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
    from smoledge.export.bundle_writer import leftovers

    entries: list[Entry] = []
    for path in _children(root / "models"):
        entries.append(Entry("models", path, _size(path)))
    for kind, folders in (("exports", [root / "exports"]), ("hub bundles", _children(root / "hub"))):
        for folder in folders:  # `smoledge run MODEL`'s exports, `smoledge pull`'s bundles (<owner>--<name>/<commit>)
            dead = set(leftovers(folder))
            for path in _children(folder):
                stale = path in dead
                entries.append(Entry("leftovers" if stale else kind, path, _size(path), stale=stale))
    bundles = root / "bundles"
    dead = set(leftovers(bundles)) | set(_dead_partials(bundles))
    for path in _children(bundles):
        if path.is_dir():
            kind = "leftovers" if path in dead or ".partial" in path.name else "extracted zips"
            entries.append(Entry(kind, path, _size(path), stale=kind == "leftovers" or _zip_gone(path)))
    for path in _children(root / "verified"):
        entries.append(Entry("verify stamps", path, _size(path), stale=_stamp_gone(path)))
    for kind, sub in (("calibration", "calibration"), ("bench", "bench")):
        for path in _children(root / sub):
            entries.append(Entry(kind, path, _size(path)))
    for path in root.glob("*ledger*.sqlite*"):
        entries.append(Entry("ledger", path, _size(path)))
    return entries


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
        print(json.dumps({"cache_dir": str(root), "entries": [e.to_json() for e in entries]}))
        return 0
    print(f"smoledge cache: {root}")
    for kind in KINDS:
        mine = [e for e in entries if e.kind == kind]
        if mine:
            stale = sum(e.stale for e in mine)
            note = f", {stale} stale (smoledge cache prune)" if stale else ""
            print(f"  {kind:15} {len(mine):4} item(s) {_human(sum(e.size for e in mine)):>10}{note}")
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
