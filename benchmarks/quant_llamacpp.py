"""llama.cpp's quantizers in the sweep's harness: ``python -m smoledge.benchmarks.quant_llamacpp``.

The real-text model's text decoder is converted to an F32 GGUF (:mod:`smoledge.benchmarks.gguf_convert`'s
writer; F32 so llama.cpp starts from the same fp32 weights our quantizers do) and quantized by llama.cpp itself (``llama_model_quantize``) to each type; every one is scored exactly as
the sweep scores our candidates (:mod:`smoledge.benchmarks.quant_sweep`): teacher-forced on the same token
ids of the same two texts, KL(fp32 graphs || candidate) and top-1 pooled over every position, bits per
weight over embedding + decoder matrices + lm_head (a tied output counted as its own matrix, as our
bundles store it; norms left out on both sides).

It also says how much of each type's fidelity is the source's grid: the real-text weights were GGUF Q4_1
(block 32, fp16 scale and min), so a quantizer whose blocks can land on that grid reproduces the
reference weights exactly.  Per tensor kind, the fraction of weights whose dequantized value is within
1e-6 of the fp32 reference (``--grid``).  Results go to ``<work>/llamacpp.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from smoledge.benchmarks.quant_sweep import Workspace, pooled_score, reference_logits, scored_ids

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q4_K_S", "Q4_K_M", "IQ4_NL")
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q4_K_S": 14, "Q4_K_M": 15, "IQ4_NL": 25}
KIND = re.compile(r"^(?:blk\.\d+\.)?([a-z_]+?)(?:\.weight)?$")


def write_f32_gguf(model_dir: Path, out: Path) -> Path:
    from smoledge.benchmarks import gguf_convert as g

    config = json.loads((model_dir / "config.json").read_text())
    text = config["text_config"]
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))

    def metadata(writer):
        g._text_metadata(writer, config)
        g._tokenizer_metadata(writer, model_dir, text["vocab_size"], text)

    items = [(name, hf_name, path, "F32") for name, hf_name, path, _ in g._text_items(model_dir, text, tied)]
    return g._write(out, "llama", metadata, items, lambda name, hf_name, path: g._text_array(
        name, g._load(path, hf_name), text))


def quantize(src: Path, dst: Path, qtype: str, threads: int) -> Path:
    import ctypes

    import llama_cpp

    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = FTYPES[qtype], threads, True
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize -> {qtype} failed")
    os.replace(tmp, dst)
    return dst


def bits_per_weight(path: Path) -> tuple[float, dict[str, str]]:
    """Over the 2-D tensors (embedding, decoder matrices, output), a tied output counted twice."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    bits = weights = 0
    types = {}
    names = {t.name for t in reader.tensors}
    for t in reader.tensors:
        if len(t.shape) < 2:
            continue
        times = 2 if t.name == "token_embd.weight" and "output.weight" not in names else 1
        bits += times * int(t.n_bytes) * 8
        weights += times * int(t.n_elements)
        kind = KIND.match(t.name).group(1)
        types.setdefault(kind, set()).add(t.tensor_type.name)
    return bits / weights, {k: "/".join(sorted(v)) for k, v in types.items()}


def logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    llm.reset()
    llm.eval(list(ids))
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def decode_ms(path: Path, threads: int, context: int = 128, steps: int = 24) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(list(range(10, 10 + context)))
    times = []
    for i in range(steps):
        start = time.perf_counter()
        llm.eval([100 + i])
        times.append(time.perf_counter() - start)
    llm.close()
    return 1000 * float(np.median(times))


def reference_weights(ws: Workspace) -> dict[str, np.ndarray]:
    """The fp32 checkpoint's text matrices, in the GGUF's names and layout (q/k rows permuted)."""
    from smoledge.benchmarks.gguf_convert import _load, _text_array, _text_items

    config = json.loads((ws.model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    out = {}
    for gguf_name, hf_name, path, storage in _text_items(ws.model_dir, text, tied):
        if storage == "F16":  # the matrices (norms are F32)
            out[gguf_name] = _text_array(gguf_name, _load(path, hf_name), text)
    return out


def grid_match(path: Path, reference: dict[str, np.ndarray], tol: float = 1e-6) -> dict[str, float]:
    """Per tensor kind: the fraction of weights whose dequantized value is within ``tol`` of the reference."""
    import gguf

    hit: dict[str, int] = {}
    total: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        name = t.name.removesuffix(".weight")
        if name not in reference and t.name not in reference:
            continue
        ref = reference.get(t.name, reference.get(name))
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        kind = KIND.match(t.name).group(1)
        hit[kind] = hit.get(kind, 0) + int(np.sum(np.abs(got - ref) <= tol))
        total[kind] = total.get(kind, 0) + ref.size
    out = {k: round(hit[k] / total[k], 4) for k in sorted(total)}
    out["all"] = round(sum(hit.values()) / sum(total.values()), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/smoledge-quant-sweep"))
    parser.add_argument("--types", nargs="*", default=list(TYPES))
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--f32", action="store_true", help="also score the F32 source (a check: KL 0)")
    parser.add_argument("--grid", action="store_true", help="also the fraction of weights on the reference's grid")
    args = parser.parse_args(argv)
    ws = Workspace(args.work)
    folder = args.work / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "text-F32.gguf"
    if not f32.exists():
        write_f32_gguf(ws.model_dir, f32)
    refs = reference_logits(ws, args.max_tokens)
    ids = scored_ids(ws, args.max_tokens)
    reference = reference_weights(ws) if args.grid else None
    rows = []
    for qtype in [*(["F32"] if args.f32 else []), *args.types]:
        path = f32 if qtype == "F32" else quantize(f32, folder / f"text-{qtype}.gguf", qtype, args.threads)
        bpw, types = bits_per_weight(path)
        row = {"candidate": f"llama.cpp {qtype}", **pooled_score(refs, {n: logits(path, i, args.threads)
                                                                      for n, i in ids.items()}),
               "bits_per_weight": round(bpw, 3), "decode_ms": round(decode_ms(path, args.threads), 2),
               "tensor_types": types}
        if reference is not None:
            row["on_reference_grid"] = grid_match(path, reference)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with (args.work / "llamacpp.jsonl").open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
