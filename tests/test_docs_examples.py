"""Every code block of README.md and docs/*.md is in the checked list tests/docs_examples.toml: run here
against the demo bundle (the suite's real-text INT4 bundle, greedy where an output is shown) with its shown
output compared, or listed with the reason it cannot run here.  A block missing from the list fails, and
the failure prints the entry to add (file, line, first line).  Also: docs/env.md lists every SMOLEDGE_*
variable the code reads, the README's Documentation index links every docs page, building smoledge and
`make demo` print no warnings, and a second `make demo` does not re-export."""

from __future__ import annotations

import json
import queue
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from docs_blocks import Block, all_blocks

LIST = REPO / "tests" / "docs_examples.toml"
ENTRIES: dict[tuple[str, str], dict] = {(e["file"], e["sha"]): e for e in tomllib.loads(LIST.read_text())["block"]}
BLOCKS = all_blocks()
RUNS = ("bash", "python", "serve", "output")
# a line a newcomer reads as breakage; pip's own notes about this machine's index locations are not ours
WARNING = re.compile(r"warn|Failed to load|deprecat", re.IGNORECASE)
PIP_INDEX_NOTE = re.compile(r"^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$")
DEMO_PORT = "127.0.0.1:8000"


def warning_lines(text: str) -> list[str]:
    return [line for line in text.replace("\r", "\n").splitlines()
            if WARNING.search(line) and not PIP_INDEX_NOTE.match(line.strip())]


# ------------------------------------------------------------------------------------------ the list


def test_every_block_is_listed():
    missing = [b for b in BLOCKS if (b.file, b.sha) not in ENTRIES]
    assert not missing, (f"{len(missing)} code block(s) are not in {LIST.relative_to(REPO)} (each must run here or "
                         "say why it cannot); add, then set run or skip:\n\n" +
                         "\n".join(f"# {b.file}:{b.line}: {b.first}\n{b.entry()}" for b in missing))


def test_no_entry_outlives_its_block():
    present = {(b.file, b.sha) for b in BLOCKS}
    stale = [e for key, e in ENTRIES.items() if key not in present and (REPO / e["file"]).is_file()]
    assert not stale, "entries whose block changed or went away (drop them; the new text is listed as missing):\n" + \
        "\n".join(f"{e['file']} {e['sha']}: {e['first']}" for e in stale)


@pytest.mark.parametrize("entry", list(ENTRIES.values()), ids=[f"{f}:{s}" for f, s in ENTRIES])
def test_every_entry_runs_or_says_why_not(entry):
    assert ("run" in entry) != ("skip" in entry), "exactly one of run / skip"
    if "skip" in entry:
        assert entry["skip"].strip() and "WHY" not in entry["skip"], "a skip names its reason"
        return
    assert entry["run"] in RUNS
    assert "subst" not in entry or entry.get("why"), "a substitution says why the block's text is changed"
    if "output" in entry:
        shown = ENTRIES.get((entry["file"], entry["output"]))
        assert shown is not None and shown.get("run") == "output", "output names a listed block of the same file"


# --------------------------------------------------------------------------------- running the blocks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, realtext_int4_bundle, tiny_int4_bundle, realtext_model_dir, tiny_model_dir):
    """A folder laid out as the README expects after `make demo`: bundles/, examples/, .venv; a cache of its
    own (so calibration and the ledger stay here) that shares the built demo models."""
    from smoledge.runtime.cache import cache_path

    root = tmp_path_factory.mktemp("docs-examples")
    (root / "bundles").mkdir()
    for name, bundle in (("smolvlm-realtext-int4", realtext_int4_bundle), ("tiny-int4", tiny_int4_bundle)):
        # hard links, not a symlink: serve names a bundle by its folder, as the README's output shows
        shutil.copytree(bundle, root / "bundles" / name, copy_function=_link_or_copy)
    shutil.copytree(REPO / "examples", root / "examples")
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "cache").mkdir()
    (root / "cache" / "models").symlink_to(cache_path("models"))
    return root


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def block_env(root: Path) -> dict:
    """A newcomer's environment: no token (so nothing can reach the cloud) and none of the suite's never-cloud
    switches, which would show in the output the README prints."""
    quiet = {"HF_HUB_OFFLINE", "SMOLEDGE_NO_CLOUD", "HF_TOKEN", "SMOLEDGE_API_KEY"}
    env = {k: v for k, v in os.environ.items() if k not in quiet}
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "SMOLEDGE_CACHE_DIR": str(root / "cache"), "PYTHONUNBUFFERED": "1"}


def _prepared(block: Block, entry: dict, port: int | None) -> str:
    text = block.text
    for old, new in entry.get("subst", {}).items():
        assert old in text, f"subst {old!r} not in the block"
        text = text.replace(old, new)
    return text.replace(DEMO_PORT, f"127.0.0.1:{port}") if port else text


@pytest.fixture(scope="module")
def server(workdir):
    """The README's `smoledge serve` block, run as shown on a free port; its first line and port."""
    block = next(b for b in BLOCKS if ENTRIES.get((b.file, b.sha), {}).get("run") == "serve")
    command = next(line for line in block.text.splitlines() if line.strip() and not line.startswith("#"))
    proc = subprocess.Popen(["bash", "-c", "exec " + command.replace("--port 8000", "--port 0")], cwd=workdir,
                            env=block_env(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    drain = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    drain.start()  # the banner and then the access log go to stderr: read them all, or a full pipe stalls serve
    try:
        first, seen = "", []
        deadline = time.monotonic() + 300
        while not first.startswith("smoledge serve: ") or " on http" not in first:
            try:
                first = lines.get(timeout=max(0.1, deadline - time.monotonic())).strip()
            except queue.Empty:
                pytest.fail(f"smoledge serve printed no banner in 300 s (exit {proc.poll()}): {seen}")
            seen.append(first)
        port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", first)
        assert port, seen
        yield first, int(port[1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


RUNNABLE = [b for b in BLOCKS if ENTRIES.get((b.file, b.sha), {}).get("run") in ("bash", "python", "serve")]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b.file}:{b.line}" for b in RUNNABLE])
def test_the_block_runs_as_shown(block, workdir, request):
    entry = ENTRIES[(block.file, block.sha)]
    if entry["run"] == "serve":
        first, port = request.getfixturevalue("server")
        shown = next(line for line in block.text.splitlines() if line.startswith("# smoledge serve:"))
        assert first == shown.removeprefix("# ").replace(DEMO_PORT, f"127.0.0.1:{port}")
        return
    port = request.getfixturevalue("server")[1] if DEMO_PORT in block.text else None
    if "setup" in entry:
        subprocess.run(["bash", "-ec", entry["setup"]], cwd=workdir, check=True)
    text = _prepared(block, entry, port)
    argv = ["bash", "-ec", text] if entry["run"] == "bash" else [sys.executable, "-c", text]
    res = subprocess.run(argv, cwd=workdir, env=block_env(workdir), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{block.file}:{block.line} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
    for expected in entry.get("expect", []):
        assert expected in res.stdout, f"{block.file}:{block.line}: {expected!r} not in its output:\n{res.stdout}"
    if entry.get("quiet"):
        assert not warning_lines(res.stdout + res.stderr), warning_lines(res.stdout + res.stderr)
    if "output" in entry:
        shown = next(b for b in BLOCKS if b.file == block.file and b.sha == entry["output"])
        assert_matches(json.loads(res.stdout), parse_shown(shown.text), where=f"{shown.file}:{shown.line}")


# ------------------------------------------------------------------------- shown output with "..." in it


def parse_shown(text: str):
    """Shown JSON, where a bare ``...`` stands for any value and ``...`` inside a string for any text."""
    return json.loads(re.sub(r"(?<=:)(\s*)\.\.\.(?=\s*[,}\]])", r'\1"..."', text))


def assert_matches(actual, shown, where: str, path: str = "") -> None:
    if isinstance(shown, dict):
        assert isinstance(actual, dict), f"{where}{path}: {actual!r}"
        for key, value in shown.items():
            assert key in actual, f"{where}: {path}.{key} is shown but not answered"
            assert_matches(actual[key], value, where, f"{path}.{key}")
    elif isinstance(shown, list):
        assert isinstance(actual, list) and len(actual) == len(shown), f"{where}{path}: {actual!r}"
        for i, (a, s) in enumerate(zip(actual, shown)):
            assert_matches(a, s, where, f"{path}[{i}]")
    elif isinstance(shown, str) and "..." in shown:
        if shown != "...":
            pattern = ".*".join(re.escape(part) for part in shown.split("..."))
            assert re.fullmatch(pattern, str(actual), re.S), f"{where}: {path} is {actual!r}, shown {shown!r}"
    else:
        assert actual == shown, f"{where}: {path} is {actual!r}, shown {shown!r}"


def test_shown_output_wildcards():
    shown = parse_shown('{"id": "chatcmpl-...", "created": ..., "n": [1, {"s": "a ... z"}]}')
    assert_matches({"id": "chatcmpl-9f", "created": 17, "n": [1, {"s": "a b z"}], "extra": 1}, shown, "x")
    for wrong in ({"id": "other", "created": 1, "n": [1, {"s": "a z"}]}, {"id": "chatcmpl-", "n": [1, {"s": "a z"}]},
                  {"id": "chatcmpl-", "created": 1, "n": [2, {"s": "a z"}]}):
        with pytest.raises(AssertionError):
            assert_matches(wrong, shown, "x")


# ------------------------------------------------------------------------------ pages and variables


def _code_files():
    for folder in ("smoledge", "export", "quantize", "runtime", "cloud_fallback", "benchmarks", "scripts", "tests"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".ts", ".sh") and "node_modules" not in path.parts and path.is_file():
                yield path


def test_env_md_lists_every_variable_the_code_reads():
    names = {m for path in _code_files() for m in re.findall(r"\bSMOLEDGE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(
        encoding="utf-8", errors="replace"))}
    assert {"SMOLEDGE_API_KEY", "SMOLEDGE_MAX_FRAMES", "SMOLEDGE_SMOLLM2_WHEEL"} <= names
    page = (REPO / "docs" / "env.md").read_text()
    assert not sorted(n for n in names if f"`{n}`" not in page), "docs/env.md misses these"


def test_the_readme_index_links_every_docs_page():
    readme = REPO.joinpath("README.md").read_text()
    index = readme[readme.index("## Documentation"):].split("\n## ", 1)[0]
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if f"(docs/{p.name})" not in index]
    assert not unlinked, f"README's Documentation section does not link {unlinked}"


# ---------------------------------------------------------------------------- a quiet, light make demo


def test_building_smoledge_prints_no_warnings(tmp_path):
    """pyproject's license and package data: setuptools used to print a deprecation per build and a
    "Package would be ignored" box per data folder."""
    source = tmp_path / "smoledge"  # a copy: the build writes build/ and *.egg-info beside pyproject.toml
    skip = shutil.ignore_patterns("node_modules", "__pycache__", "dist", "out", "web", "build", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    for folder in ("smoledge", "export", "quantize", "runtime", "cloud_fallback", "benchmarks"):
        shutil.copytree(REPO / folder, source / folder, ignore=skip)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not warning_lines(res.stdout + res.stderr), warning_lines(res.stdout + res.stderr)
    import zipfile

    (wheel,) = (tmp_path / "wheel").glob("smoledge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("smoledge/quantize/recipes/int4.json", "smoledge/quantize/calibration/calibration.txt",
                 "smoledge/quantize/fidelity_text.txt", "smoledge/cloud_fallback/profiles/auto.json",
                 "smoledge/runtime/manifest.schema.json"):
        assert data in names, f"{data} is not in the wheel"


@pytest.mark.slow
def test_make_demo_reuses_the_bundle_and_prints_no_warnings(realtext_int4_bundle, realtext_model_dir, tmp_path):
    """`make demo` with an up-to-date bundle goes straight to the answer (no export), and nothing it prints
    reads as breakage.  The install step is `make`'s (-o: this suite's environment is already installed)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(realtext_int4_bundle, bundle)
    (bundle / "manifest.json").touch()
    venv = Path(sys.prefix)
    make = ["make", "--no-print-directory", "demo", f"VENV={venv}", f"BUNDLE={bundle}",
            "-o", f"{venv}/.installed-export"]
    res = subprocess.run(make, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Paris" in res.stdout and "smoledge export" not in out, out
    assert not warning_lines(out), warning_lines(out)
    stale = time.time() - 10 * 365 * 86400  # older than every export source: the next make demo re-exports
    os.utime(bundle / "manifest.json", (stale, stale))
    dry = subprocess.run([*make, "-n"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "smoledge export" in dry.stdout and "demo-model" in dry.stdout, dry.stdout


@pytest.mark.parametrize("args", [("demo-model",), ("demo-model", "--tiny")], ids=["realtext", "tiny"])
def test_demo_model_prints_only_its_path(args, realtext_model_dir, tiny_model_dir):
    res = subprocess.run([sys.executable, "-m", "smoledge.cli", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and Path(res.stdout.strip()).is_dir(), res.stderr
    assert not warning_lines(res.stdout + res.stderr), res.stderr


# pages other helpers of this round write; the README links them already (drop a name once its page is merged)
PAGES_BEING_WRITTEN: set[str] = set()


def test_relative_links_resolve():
    broken = []
    for page in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))):
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            path = target.split("#", 1)[0]
            if not path or re.match(r"[a-z]+:", path):
                continue
            resolved = (page.parent / path).resolve()
            if not resolved.exists() and str(resolved.relative_to(REPO)) not in PAGES_BEING_WRITTEN:
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken
