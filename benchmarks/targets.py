"""The project's targets, as data, checked (never asserted) against a report.

Relative targets compare each smoledge subject with llama.cpp on the same architecture and threads;
absolute ones are about the 2.2B and are checked at ``--size full`` only; the fidelity target is about
the real-text weights and is checked at ``--size realtext`` only.  Each result says met / not met /
n/a with the measured figure, the threshold and the gap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    key: str
    description: str
    figure: str  # a figure name; "{H}" is the headline context
    kind: str  # "min_ratio" | "max_ratio" | "max_abs" | "fidelity"
    value: float
    baseline: str | None = None  # llama.cpp quantisation compared with
    sizes: tuple[str, ...] = ("realtext", "full")


TARGETS = (
    Target("decode", "decode tok/s >= 1.1x llama.cpp Q4_0", "decode_tok_s@{H}", "min_ratio", 1.1, "Q4_0"),
    Target("prefill", "prefill tok/s >= 1.2x llama.cpp Q4_0", "prefill_tok_s@{H}", "min_ratio", 1.2, "Q4_0"),
    Target("fidelity", "INT4 KL <= llama.cpp Q4_K_M's at no more bits/weight", "kl_mean", "fidelity", 1.0,
           "Q4_K_M", ("realtext",)),
    Target("vision", "vision encode per tile <= 1.5 s", "vision_s_per_tile", "max_abs", 1.5, sizes=("full",)),
    Target("ttft_image", "TTFT one image + short prompt <= llama.cpp Q4_0's", "ttft_image_s", "max_ratio", 1.0,
           "Q4_0"),
    Target("size", "whole 2.2B INT4 bundle <= 1.4 GB", "size_mb", "max_abs", 1400.0, sizes=("full",)),
    Target("rss_one_image", "peak RSS answering one image <= 1.5 GB", "rss_one_image_mb", "max_abs", 1500.0,
           sizes=("full",)),
)


def figure_of(subject: dict, name: str) -> float | None:
    if name == "size_mb":
        return subject["size_bytes"] / 1e6
    if name == "kl_mean":
        return (subject.get("fidelity") or {}).get("kl_mean")
    entry = subject.get("figures", {}).get(name)
    return entry["median"] if entry else None


def _baseline(subjects: list[dict], quant: str | None) -> dict | None:
    for s in subjects:
        if s["peer"] == "llamacpp" and s["options"].get("quant") == quant and s.get("status") == "ok":
            return s
    return None


def _result(target: Target, subject: dict, measured, threshold, met, gap: str, note: str = "") -> dict:
    return {"target": target.key, "description": target.description, "subject": subject["name"],
            "measured": measured, "threshold": threshold, "met": met, "gap": gap, "note": note}


def check(target: Target, subject: dict, subjects: list[dict], size: str, headline: int) -> dict:
    figure = target.figure.replace("{H}", str(headline))
    measured = figure_of(subject, figure)
    if size not in target.sizes:
        return _result(target, subject, measured, None, None, "", f"checked at --size {'/'.join(target.sizes)}")
    base = _baseline(subjects, target.baseline) if target.baseline else None
    if target.baseline and base is None:
        return _result(target, subject, measured, None, None, "", f"no llama.cpp {target.baseline} figures")
    if target.kind == "fidelity":
        return _check_fidelity(target, subject, base)
    reference = figure_of(base, figure) if base else None
    if measured is None or (base is not None and reference is None):
        return _result(target, subject, measured, None, None, "", f"{figure} not measured")
    threshold = target.value * reference if base else target.value
    if target.kind == "min_ratio":
        met, gap = measured >= threshold, f"{measured / threshold - 1:+.0%} vs threshold ({measured / reference:.2f}x)"
    else:
        met = measured <= threshold
        gap = f"{measured - threshold:+.3g} vs threshold" + (f" ({measured / reference:.2f}x)" if base else "")
    return _result(target, subject, measured, threshold, met, gap)


def _check_fidelity(target: Target, subject: dict, base: dict) -> dict:
    kl, base_kl = figure_of(subject, "kl_mean"), figure_of(base, "kl_mean")
    bits, base_bits = subject.get("bits_per_weight"), base.get("bits_per_weight")
    if kl is None or base_kl is None:
        return _result(target, subject, kl, base_kl, None, "", "fidelity not measured")
    met = kl <= base_kl and (bits is None or base_bits is None or bits <= base_bits)
    gap = f"KL {kl:.4f} vs {base_kl:.4f}; bits/weight {bits} vs {base_bits}"
    return _result(target, subject, kl, base_kl, met, gap)


def check_all(report: dict) -> list[dict]:
    subjects = report["subjects"]
    headline = report["settings"]["workload"]["headline_context"]
    ours = [s for s in subjects if s["peer"] == "smoledge" and s.get("status") == "ok"]
    return [check(t, s, subjects, report["size"], headline) for s in ours for t in TARGETS]
