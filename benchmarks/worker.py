"""One measured pass over one subject, in its own process: ``python -m smoledge.benchmarks.worker JOB OUT``.

``JOB`` is a JSON file (subject, mode, threads, workload, cases, context ids); ``OUT`` receives the
figures as JSON.  Modes:

* ``speed``: load; a text and a one-image request as warm-up (first runs pay for graph planning and
  buffers); the one-image request (peak RSS here is the "answering one image" figure: load + image
  answers, nothing else yet); the text and split requests; vision seconds per tile; then prefill and
  decode at each context length; the peak RSS of the whole pass.
* ``fidelity``: load (llama.cpp with all logits kept) and save teacher-forced logits per text chunk
  as ``.npy`` files next to ``OUT``.

Peak RSS is the process's high-water mark (``VmHWM``), so each subject's figure is its own.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np

from smoledge.benchmarks.peers import Case, Subject, peer_module
from smoledge.runtime.memory_probe import peak_rss  # imported before any subject runs: every baseline holds it


def peak_rss_mb() -> float:
    """This process's peak RSS in MB (1e6 bytes): :func:`smoledge.runtime.memory_probe.peak_rss`."""
    return round(peak_rss() / 1e6, 1)


def _first_tokens(engine, cases: dict[str, Case]) -> dict:
    figures: dict = {}
    engine.first_token(cases["text"])  # warm-up: first decoder run, lazy allocations
    engine.first_token(cases["image"])  # warm-up: first vision run (graph planning, buffers)
    order = ("image", "text", "split")
    for kind in order:
        result = engine.first_token(cases[kind])
        if kind == "image":
            figures["rss_one_image_mb"] = peak_rss_mb() if result else None
        if result is None:
            continue
        figures[f"ttft_{kind}_s"] = result.ttft_s
        if kind != "text":
            figures[f"preprocess_{kind}_s"] = result.preprocess_s
            figures[f"vision_{kind}_s"] = result.vision_s
            figures[f"tiles_{kind}"] = result.tiles or None
        figures[f"prompt_tokens_{kind}"] = result.prompt_tokens
    if figures.get("rss_one_image_mb") is None:
        figures["rss_first_answer_mb"] = peak_rss_mb()  # text-only peers: load + one text answer
    return figures


def _throughput(engine, ids: list[int], contexts: list[int], new_tokens: int) -> dict:
    figures = {}
    for ctx in contexts:
        steps = engine.generate(ids[:ctx], new_tokens + 1)
        start = time.perf_counter()
        next(steps)  # prefill + first token
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        count = sum(1 for _ in steps)
        decode = time.perf_counter() - start
        figures[f"prefill_tok_s@{ctx}"] = ctx / prefill
        figures[f"decode_tok_s@{ctx}"] = count / decode if decode > 0 else None
    return figures


def run_speed(engine, job: dict) -> dict:
    workload = job["workload"]
    cases = {kind: Case(**case) for kind, case in job["cases"].items()}
    figures = {"rss_after_load_mb": peak_rss_mb()}
    figures.update(_first_tokens(engine, cases))
    figures["vision_s_per_tile"] = engine.vision_seconds_per_tile(cases["image"].image, workload["vision_repeats"])
    figures.update(_throughput(engine, job["context_ids"], workload["contexts"], workload["decode_tokens"]))
    figures["rss_peak_mb"] = peak_rss_mb()
    return figures


def run_fidelity(engine, job: dict, out: Path) -> dict:
    files = []
    for i, ids in enumerate(job["fidelity_ids"]):
        path = out.with_name(f"{out.stem}.logits{i}.npy")
        np.save(path, engine.logits(ids).astype(np.float32))
        files.append(path.name)
    return {"logits_files": files}


def run(job: dict, out: Path) -> dict:
    subject = Subject.from_dict(job["subject"])
    module = peer_module(subject.peer)
    fidelity = job["mode"] == "fidelity"
    start = time.perf_counter()
    engine = module.open_engine(subject, job["threads"], fidelity=fidelity)
    load_s = time.perf_counter() - start
    if fidelity:
        return run_fidelity(engine, job, out)
    return {"load_s": load_s, **run_speed(engine, job)}


def main(argv: list[str]) -> int:
    job_path, out = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    try:
        result = {"ok": True, "figures": run(job, out)}
    except Exception as err:  # reported as this subject's failure; the run goes on
        result = {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500],
                  "traceback": traceback.format_exc()[-4000:]}
    out.write_text(json.dumps(result, default=_jsonable))
    return 0 if result["ok"] else 1


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
