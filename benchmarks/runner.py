"""A benchmark run: prepare the subjects, measure each in its own subprocess in alternating rounds,
take the fidelity logits, aggregate (median, min, max of the rounds) and check the targets.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from smoledge.benchmarks import models
from smoledge.benchmarks.config import BenchSettings
from smoledge.benchmarks.peers import PeerSkipped, PrepareContext, Subject, peer_module

VERSIONED = ("smoledge", "numpy", "onnxruntime", "tokenizers", "torch", "transformers", "executorch", "torchao",
             "llama_cpp_python", "onnxruntime-genai", "gguf", "matplotlib")
MIN_CONTEXT = 1024  # room for the split-image prompt (5 tiles x 81 tokens + text at the 2.2B)


@dataclass
class Prepared:
    context: PrepareContext
    subjects: list[Subject]
    skipped: list[dict] = field(default_factory=list)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare(settings: BenchSettings) -> Prepared:
    model_dir = models.model_dir_for(settings.size)
    work_dir = models.work_dir_for(settings.size, model_dir)
    bundles = settings.bundles or (models.ensure_bundle(model_dir, work_dir, formats=settings.formats),)
    workload = settings.workload
    max_tokens = max(max(workload.contexts) + workload.decode_tokens + 64, MIN_CONTEXT)
    profile = None
    if settings.profile:
        from smoledge.cloud_fallback.profiles import load_profile

        profile = load_profile(settings.profile)
    ctx = PrepareContext(settings.size, model_dir, work_dir, tuple(Path(b) for b in bundles), settings.threads,
                         max_tokens, profile)
    prepared = Prepared(ctx, [])
    for name in ("smoledge", *settings.peers):
        module = peer_module(name)
        reason = module.missing()
        if reason:
            prepared.skipped.append({"peer": name, "reason": reason})
            log(f"{name}: skipped ({reason})")
            continue
        log(f"{name}: preparing")
        try:
            prepared.subjects.extend(module.prepare(ctx))
        except Exception as err:  # a peer that cannot be built here is reported, never fatal (ours is)
            if name == "smoledge" and not isinstance(err, PeerSkipped):
                raise
            reason = str(err) if isinstance(err, PeerSkipped) else f"could not prepare: {type(err).__name__}: {err}"
            prepared.skipped.append({"peer": name, "reason": reason[:500]})
            log(f"{name}: skipped ({reason[:200]})")
    return prepared


def _job(subject: Subject, mode: str, settings: BenchSettings, inputs: dict) -> dict:
    return {"subject": subject.to_dict(), "mode": mode, "threads": settings.threads,
            "workload": settings.workload.to_dict(), **inputs}


def run_worker(job: dict, tmp: Path, timeout: float) -> tuple[dict, Path]:
    """One subprocess; returns its result and the path it wrote (logit files sit next to it)."""
    tag = f"{len(list(tmp.glob('job*.json'))):03d}"
    job_file, out = tmp / f"job{tag}.json", tmp / f"out{tag}.json"
    job_file.write_text(json.dumps(job))
    threads = str(job["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "smoledge.benchmarks.worker", str(job_file), str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}, out
    if out.is_file():
        return json.loads(out.read_text()), out
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-2:]
    return {"ok": False, "error": f"worker exited {proc.returncode}: {' | '.join(tail)[:400]}"}, out


def measure_rounds(prepared: Prepared, settings: BenchSettings, inputs: dict, tmp: Path) -> dict[str, dict]:
    """Alternating rounds: each round runs every subject once, starting one further along."""
    samples: dict[str, dict] = {s.name: {"runs": [], "errors": []} for s in prepared.subjects}
    subjects = prepared.subjects
    for round_no in range(settings.repeats):
        order = subjects[round_no % len(subjects):] + subjects[:round_no % len(subjects)] if subjects else []
        for subject in order:
            log(f"round {round_no + 1}/{settings.repeats}: {subject.name}")
            result, _ = run_worker(_job(subject, "speed", settings, inputs), tmp, settings.worker_timeout_s)
            key = "runs" if result["ok"] else "errors"
            samples[subject.name][key].append(result["figures"] if result["ok"] else result["error"])
            if not result["ok"]:
                log(f"  failed: {result['error']}")
    return samples


def measure_fidelity(prepared: Prepared, settings: BenchSettings, inputs: dict, tmp: Path) -> dict[str, dict]:
    from smoledge.benchmarks import fidelity
    from smoledge.benchmarks.peer_transformers import missing as transformers_missing
    from smoledge.benchmarks.peer_transformers import reference_subject

    reason = transformers_missing()
    if reason:
        return {s.name: {"skipped": f"no fp32 reference: {reason}"} for s in prepared.subjects}
    log("fidelity: transformers fp32 reference")
    result, out = run_worker(_job(reference_subject(prepared.context), "fidelity", settings, inputs), tmp,
                             settings.worker_timeout_s)
    if not result["ok"]:
        return {s.name: {"skipped": f"the fp32 reference failed: {result['error']}"} for s in prepared.subjects}
    reference = fidelity.load_logits(out, result["figures"]["logits_files"])
    figures = {}
    for subject in prepared.subjects:
        if subject.peer == "transformers":
            figures[subject.name] = {"reference": True}
            continue
        log(f"fidelity: {subject.name}")
        result, out = run_worker(_job(subject, "fidelity", settings, inputs), tmp, settings.worker_timeout_s)
        try:
            logits = fidelity.load_logits(out, result["figures"]["logits_files"]) if result["ok"] else None
            figures[subject.name] = fidelity.compare(reference, logits) if result["ok"] else {"error": result["error"]}
        except ValueError as err:
            figures[subject.name] = {"error": str(err)}
    return figures


def summarise(values: list) -> dict | None:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values), "n": len(values),
            "spread": (max(values) - min(values)) / median if median else 0.0}


def aggregate(subject: Subject, sample: dict, fidelity_figures: dict | None) -> dict:
    runs = sample["runs"]
    names = sorted({k for run in runs for k in run})
    figures = {name: s for name in names if (s := summarise([run.get(name) for run in runs])) is not None}
    entry = {**subject.to_dict(), "status": "ok" if runs else "failed", "figures": figures,
             "errors": sample["errors"]}
    if fidelity_figures is not None:
        entry["fidelity"] = fidelity_figures
    return entry


def machine() -> dict:
    cpu = platform.processor()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "logical_cpus": os.cpu_count(), "memory_gb": round(memory / 1e9, 1) if memory else None,
            "python": platform.python_version()}


def versions() -> dict:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


class LoadSampler:
    """The 1-minute load average every ``every_s`` while the subjects are measured: the report says when other
    processes shared the CPUs (a busy machine distorts speed ratios between subjects, not only the figures)."""

    def __init__(self, every_s: float = 5.0):
        import threading

        self.every_s, self.samples = every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-load", daemon=True)

    def _run(self):
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every_s):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        return {"mean": round(sum(self.samples) / len(self.samples), 2), "max": round(max(self.samples), 2),
                "n": len(self.samples), "every_s": self.every_s}


def run_bench(settings: BenchSettings) -> dict:
    from smoledge.benchmarks.targets import check_all

    started, load_before = time.perf_counter(), os.getloadavg()
    prepared = prepare(settings)
    prepare_s = time.perf_counter() - started
    maker = models.PromptMaker(prepared.context.bundles[0])
    image, split = models.write_images(prepared.context.work_dir, settings.workload)
    workload = settings.workload
    inputs = {"cases": {k: vars(c) for k, c in maker.cases(workload, image, split).items()},
              "context_ids": maker.context_ids(max(workload.contexts)), "fidelity_ids": maker.fidelity_ids()}
    with tempfile.TemporaryDirectory(prefix="smoledge-bench-") as tmp, LoadSampler() as during:
        samples = measure_rounds(prepared, settings, inputs, Path(tmp))
        do_fidelity = settings.fidelity if settings.fidelity is not None else settings.size == "realtext"
        fid = measure_fidelity(prepared, settings, inputs, Path(tmp)) if do_fidelity else {}
    report = {
        "schema": "smoledge-bench/1", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "size": settings.size, "settings": settings.to_dict(), "machine": machine(), "versions": versions(),
        "model": {"dir": str(prepared.context.model_dir), "bundles": [str(b) for b in prepared.context.bundles]},
        "subjects": [aggregate(s, samples[s.name], fid.get(s.name) if do_fidelity else None)
                     for s in prepared.subjects],
        "skipped": prepared.skipped,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg()), "during": during.summary()},
        "timing": {"prepare_s": round(prepare_s, 1), "total_s": round(time.perf_counter() - started, 1)},
    }
    report["targets"] = check_all(report)
    return report
