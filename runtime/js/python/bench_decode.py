"""Decode speed of the TypeScript runtime on Node beside the Python runtime, on the same bundle (a benchmark,
not a test): ``python runtime/js/python/bench_decode.py [--bundle B] [--runs 3] [--tokens 64]``.

Each runtime answers the same text prompt greedily for ``--tokens`` new tokens (EOS ignored: the stop list is
emptied, so both decode the same count); decode tok/s = (new tokens - 1) / (total - time to first token), the
median over the runs. The Node side runs ``smoledge-js run --json`` (its stats). Writes
benchmarks/results/js-decode.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
JS = REPO / "runtime" / "js"
PROMPT = "Write a long story about a lighthouse keeper and the sea."


def python_run(bundle: Path, tokens: int) -> dict:
    from smoledge.runtime.pipeline import Pipeline
    from smoledge.runtime.types import ChatRequest, Message, SamplingConfig

    pipe = Pipeline.load(bundle)
    pipe.eos_ids = ()  # decode exactly `tokens` tokens, as the Node side does
    request = ChatRequest((Message.user(PROMPT),), SamplingConfig(max_new_tokens=tokens))
    start = time.perf_counter()
    ids = [c.token_id for c in pipe.stream(request)]
    s = pipe.last_stats
    total = time.perf_counter() - start
    return {"new_tokens": len(ids), "first_token_s": s.time_to_first_token_s,
            "decode_tok_s": (len(ids) - 1) / max(s.total_s - s.time_to_first_token_s, 1e-9), "total_s": total, "ids": ids}


def node_run(bundle: Path, tokens: int) -> dict:
    out = subprocess.run(["node", str(JS / "dist" / "src" / "cli.js"), "run", str(bundle), "--prompt", PROMPT,
                          "--max-new-tokens", str(tokens), "--json", "--ignore-eos"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    s = r["stats"]
    n = len(r["generated_ids"])
    return {"new_tokens": n, "first_token_s": s["timeToFirstTokenMs"] / 1000,
            "decode_tok_s": (n - 1) / max((s["totalMs"] - s["timeToFirstTokenMs"]) / 1000, 1e-9), "total_s": s["totalMs"] / 1000,
            "ids": r["generated_ids"]}


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    import vectors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: the real-text INT4 bundle (cached)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    bundle = args.bundle or vectors.cached_bundles()[1]
    load = os.getloadavg()[0]
    results = {}
    for name, fn in (("python-onnxruntime", python_run), ("node-onnxruntime-node", node_run)):
        runs = [fn(bundle, args.tokens) for _ in range(args.runs)]
        results[name] = {"decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in runs),
                         "first_token_s_median": statistics.median(r["first_token_s"] for r in runs),
                         "new_tokens": runs[0]["new_tokens"], "runs": [{k: v for k, v in r.items() if k != "ids"} for r in runs],
                         "ids": runs[0]["ids"]}
    import onnxruntime

    from smoledge.runtime.bundle import open_bundle

    node_ort = json.loads((JS / "node_modules" / "onnxruntime-node" / "package.json").read_text())["version"]
    same = results["python-onnxruntime"].pop("ids") == results["node-onnxruntime-node"].pop("ids")
    manifest = open_bundle(bundle, verify=False).manifest
    record = {"bundle": manifest.source.model_id, "recipe": "int4",
              "prompt": PROMPT, "tokens": args.tokens, "runs": args.runs, "same_tokens": same,
              "machine": {"cpu_count": os.cpu_count(), "load_average_1min_at_start": round(load, 2), "platform": platform.platform(), "python": platform.python_version(),
                          "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip(),
                          "onnxruntime_python": onnxruntime.__version__, "onnxruntime_node": node_ort},
              "results": results}
    out = REPO / "benchmarks" / "results"
    (out / "js-decode.json").write_text(json.dumps(record, indent=1) + "\n")
    rows = "\n".join(f"| {name} | {r['decode_tok_s_median']:.1f} | {r['first_token_s_median']:.2f} | {r['new_tokens']} |"
                     for name, r in results.items())
    (out / "js-decode.md").write_text(
        f"# Decode speed: TypeScript runtime (Node) beside the Python runtime\n\n"
        f"Bundle: real-text demo model, INT4 (`{record['recipe']}`); prompt \"{PROMPT}\", {args.tokens} new tokens, greedy, "
        f"EOS ignored; median of {args.runs} runs; same tokens from both: {same}.\n"
        f"Machine: {os.cpu_count()} CPUs, shared (1-min load average {load:.1f} at the start: the figures compare the two "
        f"runtimes side by side, not the hardware), {record['machine']['platform']}; onnxruntime {onnxruntime.__version__} "
        f"(Python), onnxruntime-node {node_ort}, Node {record['machine']['node']}.\n\n"
        f"| runtime | decode tok/s | first token s | new tokens |\n|---|---|---|---|\n{rows}\n")
    print((out / "js-decode.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
