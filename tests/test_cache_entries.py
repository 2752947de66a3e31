"""Everything smoledge writes under its cache dir is registered once (smoledge.runtime.cache.CACHE_ENTRIES) and
shown by `smoledge cache` with its size and what it is.

A writer that builds a cache path by hand (``cache_dir() / "new-folder"``) fails the first test; a
registered entry the listing does not show fails the second; whatever else lies in the cache is shown as
``unknown`` rather than hidden.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from conftest import REPO

from smoledge.cli import main
from smoledge.runtime.cache import CACHE_ENTRIES, cache_path

SKIP_DIRS = {".venv", "node_modules", ".git", "build", "dist", "bundles"}
# what holds the cache root: a call of one of these, or a variable / attribute of this name
ROOT_CALLS = {"cache_dir", "default_cache_dir", "user_cache_dir", "_cache_root"}
ROOT_NAMES = {"cache_dir", "cache_root"}


def _sources(*suffixes: str) -> list[Path]:
    return sorted(p for p in REPO.rglob("*") if p.suffix in suffixes and p.is_file()
                  and not SKIP_DIRS & set(p.relative_to(REPO).parts))


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_root(node: ast.AST) -> bool:
    """An expression that is the cache root itself: cache_dir(), Path(cache_dir), config.cache_dir, ..."""
    if isinstance(node, ast.Call):
        if _name(node.func) in ROOT_CALLS:
            return True
        return _name(node.func) == "Path" and len(node.args) == 1 and _is_root(node.args[0])
    return _name(node) in ROOT_NAMES


def _hand_built(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _is_root(node.left):
            yield node
        elif isinstance(node, ast.Call) and _name(node.func) == "join" and node.args and _is_root(node.args[0]):
            yield node  # os.path.join(cache_dir(), ...)


def test_every_write_under_the_cache_goes_through_the_registry():
    found = []
    for path in _sources(".py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}" for node in _hand_built(tree)]
    assert not found, ("paths built under the smoledge cache by hand; register the folder in "
                       "smoledge.runtime.cache.CACHE_ENTRIES and use cache_path(NAME):\n" + "\n".join(found))


def test_every_name_given_to_cache_path_is_registered():
    registered = {entry.name for entry in CACHE_ENTRIES}
    used = {}
    for path in [p for p in _sources(".py", ".sh", ".mjs", ".js", ".ts") if p != Path(__file__).resolve()] + [
            REPO / "Makefile"]:
        for name in re.findall(r"cache_path\(\s*[\"']([^\"']+)[\"']", path.read_text(encoding="utf-8")):
            used.setdefault(name, str(path.relative_to(REPO)))
    assert used, "the scan found no cache_path(...) call: the test is looking in the wrong place"
    assert not {n: w for n, w in used.items() if n not in registered}, "unregistered cache entries"
    unused = registered - set(used)
    assert not unused, f"registered but never written through cache_path: {sorted(unused)}"
    with pytest.raises(ValueError, match="not a registered smoledge cache entry"):
        cache_path("surprise")


def test_the_registry_describes_every_entry_once():
    names = [entry.name for entry in CACHE_ENTRIES]
    kinds = [entry.kind for entry in CACHE_ENTRIES]
    assert len(set(names)) == len(names) and len(set(kinds)) == len(kinds)
    assert all(entry.what.strip() and "/" not in entry.name for entry in CACHE_ENTRIES)


@pytest.fixture
def full_cache(tmp_path, monkeypatch) -> Path:
    """A cache holding one item of every registered entry, and one folder nothing registers."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SMOLEDGE_CACHE_DIR", str(root))
    for entry in CACHE_ENTRIES:
        path = cache_path(entry.name)
        if entry.file:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 1000)
        else:
            item = path / ("owner--name" if entry.name == "hub" else "item")
            item.mkdir(parents=True)
            (item / "data.bin").write_bytes(b"x" * 2048)
            if entry.name == "hub":
                (item / ("a" * 40)).mkdir()
            if entry.name == "bundles":  # an extracted copy whose zip is still there
                source = tmp_path / "b.zip"
                source.write_bytes(b"zip")
                st = source.stat()
                (path / "item.source.json").write_text(json.dumps(
                    {"zip": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    (root / "surprise").mkdir()
    (root / "surprise" / "blob").write_bytes(b"y" * 10)
    return root


def test_smoledge_cache_lists_every_registered_entry_with_what_it_is(full_cache, capsys):
    assert main(["cache", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    kinds = {e["kind"] for e in shown["entries"]}
    for entry in CACHE_ENTRIES:
        assert entry.kind in kinds, f"`smoledge cache` does not list {entry.name}/ ({entry.kind})"
        assert shown["kinds"][entry.kind] == entry.what
    unknown = [e for e in shown["entries"] if e["kind"] == "unknown"]
    assert [Path(e["path"]).name for e in unknown] == ["surprise"] and unknown[0]["bytes"] == 10
    assert main(["cache"]) == 0
    text = capsys.readouterr().out
    for entry in CACHE_ENTRIES:
        line = next((line for line in text.splitlines() if line.strip().startswith(entry.kind + " ")), None)
        assert line is not None and entry.what in line, text
    assert re.search(r"memory +1 item\(s\) +2\.0 KiB", text) and re.search(r"test bundles +1 item\(s\)", text), text
    assert "unknown" in text and "delete it by hand" in text
    assert main(["cache", "prune", "--all"]) == 0  # prune never touches what it does not know
    assert (full_cache / "surprise" / "blob").exists() and (full_cache / "memory" / "item").exists()
