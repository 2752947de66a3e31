"""How faithful a quantized bundle is to its fp32 reference: ``smoledge fidelity Q --reference FP32``.

Per graph and end to end, on a fixed English text (``fidelity_text.txt``, teacher-forced) and fixed
synthetic image tiles:

* ``vision_encoder``: cosine similarity of the image features;
* ``embed_tokens``: cosine similarity of the embeddings;
* ``decoder``: the quantized decoder fed the *reference* embeddings: KL(fp32 || quant) of
  the next-token distributions (nats, mean over positions), top-1 agreement, logit cosine;
* ``end_to_end``: the quantized embedding + decoder against the fp32 ones, same figures.

Only the runtime (onnxruntime + numpy) is needed; logits come from the backend's own all-positions call
(:func:`smoledge.runtime.backends.all_logits`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from smoledge import quantize
from smoledge.quantize.recipe import QuantReport

TEXT_FILE = Path(quantize.__file__).parent / "fidelity_text.txt"  # package data of smoledge.quantize


@dataclass(frozen=True)
class DecoderFidelity:
    kl_mean: float
    kl_max: float
    top1_agreement: float
    logit_cosine: float
    positions: int


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12
    return float((num / den).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, quant: np.ndarray) -> DecoderFidelity:
    """ref, quant: [positions, vocab]."""
    lp, lq = _log_softmax(ref), _log_softmax(quant)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    agree = (ref.argmax(-1) == quant.argmax(-1)).mean()
    return DecoderFidelity(float(kl.mean()), float(kl.max()), float(agree), _cosine(ref, quant), len(ref))


def _tiles(image_size: int, count: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:image_size, 0:image_size] / image_size
    base = np.stack([np.sin(6 * x), np.cos(4 * y), x * y], 0)[None].repeat(count, 0)
    pixels = np.clip(base + rng.normal(0, 0.2, base.shape), -1, 1).astype(np.float32)
    return pixels, np.ones((count, image_size, image_size), dtype=bool)


def measure(quant_path: str | Path, reference_path: str | Path, max_tokens: int = 512,
            texts: list[Path] | None = None) -> dict:
    from smoledge.runtime.backends import all_logits as _all_logits
    from smoledge.runtime.pipeline import Pipeline

    quant, ref = Pipeline.load(quant_path), Pipeline.load(reference_path)
    texts = list(texts or [TEXT_FILE])
    chunks = [line for path in texts for line in Path(path).read_text().splitlines() if line.strip()]
    report: dict = {"bundle": str(quant_path), "reference": str(reference_path), "graphs": {}}
    qa = quant.bundle.artifact("onnx")
    report["recipe"] = qa.recipe_name
    report["texts"] = [str(p) for p in texts]
    report["bits_per_weight"] = {name: graph.bits_per_weight for name, graph in qa.graphs.items()}
    report["text_bits_per_weight"] = _text_bits_per_weight({n: g.quantization or {} for n, g in qa.graphs.items()})
    pixels, mask = _tiles(quant.manifest.model.vision.image_size)
    report["graphs"]["vision_encoder"] = {"cosine": _cosine(ref.backend.encode_images(pixels, mask),
                                                            quant.backend.encode_images(pixels, mask))}
    dec, e2e, emb_cos = [], [], []
    for chunk in chunks:
        ids = np.asarray([quant.tokenizer.encode(chunk).ids[:max_tokens]], dtype=np.int64)
        ref_emb, q_emb = ref.backend.embed(ids), quant.backend.embed(ids)
        emb_cos.append(_cosine(ref_emb[0], q_emb[0]))
        ref_logits = _all_logits(ref.backend, ref_emb)
        dec.append((compare_logits(ref_logits, _all_logits(quant.backend, ref_emb)), len(ids[0])))
        e2e.append((compare_logits(ref_logits, _all_logits(quant.backend, q_emb)), len(ids[0])))
    report["graphs"]["embed_tokens"] = {"cosine": float(np.mean(emb_cos))}
    report["graphs"]["decoder"] = _pool(dec)
    report["end_to_end"] = _pool(e2e)
    return report


def _text_bits_per_weight(graphs: dict) -> float:
    """Bits per weight over the text path (embedding + decoder with lm_head), scales and zero points counted."""
    parts = [QuantReport.from_dict(graphs[g]) for g in ("embed_tokens", "decoder") if graphs.get(g)]
    return round(QuantReport.combined(parts).bits_per_weight, 3)


def _pool(items: list[tuple[DecoderFidelity, int]]) -> dict:
    total = sum(n for _, n in items)
    pooled = {key: sum(getattr(f, key) * n for f, n in items) / total
              for key in ("kl_mean", "top1_agreement", "logit_cosine")}
    pooled["kl_max"] = max(f.kl_max for f, _ in items)
    pooled["positions"] = total
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in pooled.items()}


def format_report(report: dict) -> str:
    g, e = report["graphs"], report["end_to_end"]
    d = g["decoder"]
    bpw = ", ".join(f"{k} {v:.2f}" for k, v in report["bits_per_weight"].items())
    return "\n".join([
        f"recipe {report['recipe']} vs fp32 ({e['positions']} teacher-forced tokens); bits/weight: {bpw}",
        f"  vision_encoder        cosine {g['vision_encoder']['cosine']:.5f}",
        f"  embed_tokens          cosine {g['embed_tokens']['cosine']:.5f}",
        f"  decoder               KL {d['kl_mean']:.4f} nats  top-1 {100 * d['top1_agreement']:.1f}%  "
        f"cosine {d['logit_cosine']:.5f}",
        f"  end to end            KL {e['kl_mean']:.4f} nats  top-1 {100 * e['top1_agreement']:.1f}%  "
        f"cosine {e['logit_cosine']:.5f}  at {report.get('text_bits_per_weight', 0):.2f} bits/weight "
        "(embedding + decoder + lm_head)",
    ])


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="the quantized bundle")
    parser.add_argument("--reference", required=True, help="an fp32 bundle of the same checkpoint (--quant fp32)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--text", type=Path, action="append", dest="texts", metavar="FILE",
                        help="score this text instead of the shipped one (repeatable; one sequence per line)")


def main(args: argparse.Namespace) -> int:
    from smoledge.errors import ConfigError
    from smoledge.runtime.bundle import open_bundle

    q, r = open_bundle(args.bundle, verify=False), open_bundle(args.reference, verify=False)
    if q.manifest.source.files != r.manifest.source.files:
        raise ConfigError("the two bundles come from different checkpoints", hint="export both from one model")
    for path in args.texts or []:
        if not path.is_file():
            raise ConfigError(f"cannot read --text {path}", hint="give a UTF-8 text file (one sequence per line)")
    report = measure(args.bundle, args.reference, texts=args.texts)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


__all__ = ["DecoderFidelity", "asdict", "compare_logits", "measure", "format_report"]
