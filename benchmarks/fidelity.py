"""Quality next to speed: every subject's teacher-forced logits on the fidelity text against the
transformers fp32 reference, with ``quantize.fidelity.compare_logits`` (KL(fp32 || subject) in nats,
top-1 agreement, logit cosine), pooled over all positions.

Vocabularies are compared on their common prefix (a GGUF or genai model may pad or trim the rows that
no text token reaches); the reference is renormalised over the same rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smoledge.fidelity import compare_logits


def load_logits(out_file: Path, files: list[str]) -> list[np.ndarray]:
    return [np.load(out_file.with_name(name)) for name in files]


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} logit chunks against {len(reference)} reference chunks")
    vocab = min(min(r.shape[-1] for r in reference), min(c.shape[-1] for c in candidate))
    ref = np.concatenate([r[:, :vocab] for r in reference])
    got = np.concatenate([c[:, :vocab] for c in candidate])
    if ref.shape != got.shape:
        raise ValueError(f"logits of shape {got.shape} against reference {ref.shape}")
    result = compare_logits(ref, got)
    return {"kl_mean": round(result.kl_mean, 6), "kl_max": round(result.kl_max, 6),
            "top1_agreement": round(result.top1_agreement, 6), "logit_cosine": round(result.logit_cosine, 6),
            "positions": result.positions, "vocab_compared": int(vocab)}
