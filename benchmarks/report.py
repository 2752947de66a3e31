"""A report three ways: ``bench-<size>.json`` (everything), ``bench-<size>.md`` (tables, targets) and
``bench-<size>.png`` (the main figures as bars, with min-max whiskers over the rounds)."""

from __future__ import annotations

import json
from pathlib import Path

# (figure, label, format) rows of the Markdown table; "{H}" etc. are filled from the workload
ROWS = (
    ("size_mb", "artifact size (MB)", "{:.0f}"),
    ("bits_per_weight", "bits / weight (text)", "{:.2f}"),
    ("load_s", "load (s)", "{:.2f}"),
    ("preprocess_image_s", "preprocess, 1 image (s)", "{:.3f}"),
    ("vision_s_per_tile", "vision encode / tile (s)", "{:.3f}"),
    ("ttft_text_s", "TTFT text only (s)", "{:.3f}"),
    ("ttft_image_s", "TTFT 1 image (s)", "{:.3f}"),
    ("ttft_split_s", "TTFT split image (s)", "{:.3f}"),
    ("tiles_image", "tiles encoded, 1 image", "{:.0f}"),
    ("tiles_split", "tiles encoded, split image", "{:.0f}"),
    ("prefill_tok_s@{C}", "prefill tok/s @{C}", "{:.1f}"),
    ("decode_tok_s@{C}", "decode tok/s @{C}", "{:.1f}"),
    ("rss_one_image_mb", "peak RSS, load + 1 image (MB)", "{:.0f}"),
    ("rss_first_answer_mb", "peak RSS, load + 1 text answer (MB)", "{:.0f}"),
    ("rss_peak_mb", "peak RSS, whole pass (MB)", "{:.0f}"),
    ("kl_mean", "KL vs fp32 (nats)", "{:.4f}"),
    ("top1_agreement", "top-1 agreement vs fp32", "{:.1%}"),
)


HOW_MEASURED = """\
Each subject runs in its own process, once per round; rounds alternate the order. TTFT = request in hand
to first token id (template, tokenizer, image decode + preprocessing, vision, prefill, argmax), after a
text and an image request as warm-up; prompt "{prompt}". *1 image* = a {image} picture as one tile (splitting off);
*split image* = a {split} panorama with splitting on (tiles + global image). Vision / tile = median
encode of one tile. Prefill tok/s = context tokens / time to the first token from those ids; decode
tok/s = {decode} greedy tokens (EOS ignored) / their time. Peak RSS = the process's high-water mark: after
load + the 1-image request (text-only peers: + one text request), and over the whole pass. KL / top-1
= teacher-forced on quantize/fidelity_text.txt against transformers fp32. Sizes in MB = 1e6 bytes."""


def _value(subject: dict, figure: str):
    if figure == "size_mb":
        return subject["size_bytes"] / 1e6, None
    if figure == "bits_per_weight":
        return subject.get("bits_per_weight"), None
    if figure in ("kl_mean", "top1_agreement"):
        return (subject.get("fidelity") or {}).get(figure), None
    if figure == "rss_answer_mb":  # load + one image, or + one text answer for text-only peers
        figures = subject.get("figures", {})
        figure = "rss_one_image_mb" if "rss_one_image_mb" in figures else "rss_first_answer_mb"
    entry = subject.get("figures", {}).get(figure)
    return (entry["median"], entry) if entry else (None, None)


def _cell(subject: dict, figure: str, fmt: str) -> str:
    value, entry = _value(subject, figure)
    if value is None:
        return "ref" if figure in ("kl_mean", "top1_agreement") and (subject.get("fidelity") or {}).get("reference") \
            else "-"
    text = fmt.format(value)
    if entry and entry["n"] > 1 and entry["spread"] > 0:
        text += f" ±{entry['spread'] / 2:.0%}"
    return text


def _expand_rows(report: dict) -> list[tuple[str, str, str]]:
    rows = []
    for figure, label, fmt in ROWS:
        if "{C}" in figure:
            rows += [(figure.replace("{C}", str(c)), label.replace("{C}", str(c)), fmt)
                     for c in report["settings"]["workload"]["contexts"]]
        else:
            rows.append((figure, label, fmt))
    return rows


def busy_note(report: dict) -> list[str]:
    """A warning (and a blank line) when the load average while measuring exceeded the subjects' own threads
    by more than one: other processes shared the CPUs, so speeds and their ratios are not comparable."""
    during = report["load_average"].get("during")
    threads = report["settings"]["threads"]
    if not during or during["mean"] <= threads + 1:
        return []
    return [f"> **Busy machine:** the 1-minute load average was {during['mean']:.1f} on average (max "
            f"{during['max']:.1f}) while measuring, against {threads} threads per subject: other processes "
            "shared the CPUs, so the speed figures and the ratios between subjects are not comparable. "
            "Rerun on a quiet machine.", ""]


def markdown(report: dict) -> str:
    subjects = report["subjects"]
    settings, m = report["settings"], report["machine"]
    lines = [f"# smoledge bench: {report['size']}", "",
             f"{report['created']} | {m['cpu']} | {settings['threads']} threads | {settings['repeats']} rounds "
             f"(median, ± half the min-max spread) | load average {report['load_average']['before'][0]:.1f} -> "
             f"{report['load_average']['after'][0]:.1f}" + (" | quick" if settings["quick"] else ""), "",
             *busy_note(report),
             "| figure | " + " | ".join(s["name"] for s in subjects) + " |",
             "|---|" + "---|" * len(subjects)]
    for figure, label, fmt in _expand_rows(report):
        cells = [_cell(s, figure, fmt) for s in subjects]
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", "", "| target | subject | result | measured | threshold | gap / note |",
              "|---|---|---|---|---|---|"]
    for t in report["targets"]:
        result = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        lines.append(f"| {t['description']} | {t['subject']} | {result} | {_num(t['measured'])} | "
                     f"{_num(t['threshold'])} | {t['gap'] or t['note']} |")
    workload = settings["workload"]
    lines += ["", "## How measured", "", HOW_MEASURED.format(
        image="x".join(map(str, workload["image_size"])), split="x".join(map(str, workload["split_image_size"])),
        decode=workload["decode_tokens"], prompt=workload["prompt"])]
    lines += ["", "## Notes", ""] + [f"- **{s['name']}**: {'; '.join(s['notes'])}" for s in subjects if s["notes"]]
    lines += [f"- **{s['name']}** failed: {s['errors'][0]}" for s in subjects if s["errors"]]
    lines += [f"- **{s['peer']}** skipped: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def target_lines(report: dict) -> list[str]:
    """One line per target for the terminal: met / NOT met / n/a, measured, gap."""
    lines = []
    for t in report["targets"]:
        result = {True: "met    ", False: "NOT met", None: "n/a    "}[t["met"]]
        lines.append(f"{result} {t['description']} [{t['subject']}]: measured {_num(t['measured'])}, "
                     f"threshold {_num(t['threshold'])} {t['gap'] or t['note']}")
    return lines


CHARTS = (
    ("decode_tok_s@{H}", "decode tok/s @{H}"),
    ("prefill_tok_s@{H}", "prefill tok/s @{H}"),
    ("ttft_image_s", "TTFT 1 image (s)"),
    ("vision_s_per_tile", "vision / tile (s)"),
    ("size_mb", "size (MB)"),
    ("rss_answer_mb", "peak RSS, load + first answer (MB)"),
)


def chart(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = str(report["settings"]["workload"]["headline_context"])
    subjects = report["subjects"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (figure, title) in zip(axes.flat, CHARTS):
        figure, title = figure.replace("{H}", headline), title.replace("{H}", headline)
        names, values, low, high = [], [], [], []
        for s in subjects:
            value, entry = _value(s, figure)
            if value is None:
                continue
            names.append(s["name"].replace(" (", "\n("))
            values.append(value)
            low.append(value - entry["min"] if entry else 0)
            high.append(entry["max"] - value if entry else 0)
        ax.bar(range(len(values)), values, yerr=[low, high], capsize=3,
               color=["tab:orange" if "smoledge" in n else "tab:blue" for n in names])
        ax.set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
    fig.suptitle(f"smoledge bench: {report['size']}, {report['settings']['threads']} threads, "
                 f"median of {report['settings']['repeats']} (whiskers min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(report: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{report['size']}" + ("-quick" if report["settings"]["quick"] else "")
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths["markdown"].write_text(markdown(report))
    chart(report, paths["png"])
    return paths
