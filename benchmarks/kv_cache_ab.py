"""fp32 vs fp16 KV cache of the ONNX decoder, A/B in one process (docs/decoder.md, "KV cache precision").

``python -m smoledge.benchmarks.kv_cache_ab --a BUNDLE_FP32_KV --b BUNDLE_FP16_KV [--reference FP32_BUNDLE]
[--rounds 4] [--threads 2] [--contexts 128,512,1024] [--decode 32] --json OUT``

Speed: both bundles loaded side by side; each round runs every context on A then B (B then A on odd rounds), a
greedy decode of ``--decode`` tokens after a prompt of that many tokens (the fidelity text, repeated; the cache
holds prompt + decode positions, as the bench's). A loaded box moves absolute figures between rounds, so the
report is the per-round B/A ratio, its median, and the medians of the raw figures.

Fidelity (with ``--reference``): teacher-forced logits of the fidelity text, repeated to each context length,
from A and B against the reference (KL(ref || x) in nats, top-1 agreement); and B against A, which isolates
the KV cache's share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _ids(pipe, length: int) -> list[int]:
    from smoledge.fidelity import TEXT_FILE

    chunks = [line for line in TEXT_FILE.read_text().splitlines() if line.strip()]
    ids = [i for chunk in chunks for i in pipe.tokenizer.encode(chunk).ids]
    return (ids * (length // len(ids) + 1))[:length]


def decode_tok_s(pipe, ids: list[int], new_tokens: int) -> float:
    """Greedy tokens per second after a prefill of ``ids`` (the prefill not timed)."""
    backend = pipe.backend
    cache = backend.new_cache(len(ids) + new_tokens)
    logits = backend.step(backend.embed(np.asarray([ids], dtype=np.int64)), cache)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = backend.step(backend.embed(np.asarray([[int(logits.argmax())]], dtype=np.int64)), cache)
    return new_tokens / (time.perf_counter() - start)


def speed(a, b, contexts: list[int], rounds: int, new_tokens: int) -> dict:
    ids = _ids(a, max(contexts))
    decode_tok_s(a, ids[:32], 4), decode_tok_s(b, ids[:32], 4)  # warm-up: first runs, lazy allocations
    raw: dict = {"a": {c: [] for c in contexts}, "b": {c: [] for c in contexts}}
    for r in range(rounds):
        for ctx in contexts:
            for name, pipe in ((("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a))):
                raw[name][ctx].append(round(decode_tok_s(pipe, ids[:ctx], new_tokens), 3))
    ratios = {c: [round(y / x, 3) for x, y in zip(raw["a"][c], raw["b"][c])] for c in contexts}
    return {"raw_decode_tok_s": raw, "ratio_b_over_a": ratios,
            "median": {c: {"a": statistics.median(raw["a"][c]), "b": statistics.median(raw["b"][c]),
                           "ratio": statistics.median(ratios[c])} for c in contexts}}


def fidelity(ref, a, b, contexts: list[int]) -> dict:
    from smoledge.fidelity import compare_logits
    from smoledge.runtime.backends import all_logits

    out = {}
    for ctx in contexts:
        ids = np.asarray([_ids(ref, ctx)], dtype=np.int64)
        emb = ref.backend.embed(ids)
        logits = {name: all_logits(p.backend, emb) for name, p in (("ref", ref), ("a", a), ("b", b))}
        pairs = {"a_vs_ref": ("ref", "a"), "b_vs_ref": ("ref", "b"), "b_vs_a": ("a", "b")}
        out[ctx] = {}
        for key, (x, y) in pairs.items():
            f = compare_logits(logits[x], logits[y])
            out[ctx][key] = {"kl_mean": round(f.kl_mean, 6), "kl_max": round(f.kl_max, 6),
                             "top1_agreement": round(f.top1_agreement, 6)}
    return out


def main(argv: list[str] | None = None) -> int:
    from smoledge.runtime.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="bundle A (fp32 KV)")
    parser.add_argument("--b", required=True, help="bundle B (fp16 KV)")
    parser.add_argument("--reference", help="an fp32 bundle for fidelity")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", default="128,512,1024")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    a, b = (Pipeline.load(p, backend="onnx", threads=args.threads) for p in (args.a, args.b))
    report = {"a": args.a, "b": args.b, "threads": args.threads, "rounds": args.rounds, "decode_tokens": args.decode,
              "kv_dtypes": {"a": str(a.backend.kv_dtype.__name__), "b": str(b.backend.kv_dtype.__name__)}}
    if not args.no_speed:
        report["speed"] = speed(a, b, contexts, args.rounds, args.decode)
        print(json.dumps(report["speed"]["median"], indent=1))
    if args.reference:
        report["reference"] = args.reference
        report["fidelity"] = fidelity(Pipeline.load(args.reference, backend="onnx", threads=args.threads), a, b,
                                      contexts)
        print(json.dumps(report["fidelity"], indent=1))
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
