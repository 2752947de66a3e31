"""Where an ExecuTorch bundle's RSS goes: ``python -m smoledge.benchmarks.executorch_memory BUNDLE [--json OUT]``.

Each vision mode (``resident``, ``on-demand``) is measured in its own process: RSS and peak (``VmRSS`` /
``VmHWM``) after the imports, the program, each method, one encoded tile, a 1,000-token prefill and 20
decode steps.  The figures of docs/executorch.md's Memory section come from here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODES = ("resident", "on-demand")
PREFILL = 1000


def rss_mb() -> dict:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(status["VmRSS"].split()[0]) // 1024, "peak_mb": int(status["VmHWM"].split()[0]) // 1024}


def measure(bundle: Path, vision: str) -> list[dict]:
    """The steps of one process, in order (run in a fresh interpreter: peaks are per process)."""
    import numpy as np

    from smoledge.runtime.backends import executorch as et
    from smoledge.runtime.backends import load_backend
    from smoledge.runtime.bundle import open_bundle

    steps = []

    def mark(what: str, start: float) -> None:
        steps.append({"after": what, "seconds": round(time.perf_counter() - start, 2), **rss_mb()})

    start = time.perf_counter()
    with et.quiet_loading():
        et._pybindings()
        et.load_kernel_libraries()
    mark("imports (torch, executorch)", start)
    start = time.perf_counter()
    backend = load_backend("executorch", open_bundle(bundle, verify=False), vision=vision)
    mark("backend loaded", start)
    side = backend.tile_size
    start = time.perf_counter()
    backend.encode_images(np.zeros((1, 3, side, side), np.float32), np.ones((1, side, side), bool))
    mark("one tile encoded", start)
    cache = backend.new_cache(PREFILL + 32)
    start = time.perf_counter()
    backend.step(backend.embed((np.arange(PREFILL) % 900 + 10)[None]), cache)
    mark(f"{PREFILL}-token prefill", start)
    start = time.perf_counter()
    for _ in range(20):
        backend.step(backend.embed(np.array([[5]])), cache)
    mark("20 decode steps", start)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smoledge.benchmarks.executorch_memory")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in this process
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.bundle, args.mode)))
        return 0
    figures = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, "-m", "smoledge.benchmarks.executorch_memory", str(args.bundle),
                              "--mode", mode], capture_output=True, text=True, check=True)
        figures[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    for mode, steps in figures.items():
        print(f"vision {mode}")
        for step in steps:
            print(f"  {step['after']:<28} {step['rss_mb']:>5} MB  (peak {step['peak_mb']} MB, {step['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
