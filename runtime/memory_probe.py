"""Measure what a bundle's requests cost in memory: each probe runs in its own child process.

``measure_memory(bundle, fmt)`` loads the bundle in a fresh Python (so the caller's memory - export's
torch, a server's threads - does not count), answers one small request, and reads the child's peak
resident set size (``getrusage`` / ``/proc/self/status`` ``VmHWM``).  A few probes of different shapes
give the figures the router's memory model needs (:class:`~smoledge.runtime.manifest.MeasuredMemory`):

* ``fixed_bytes``: the process after load plus a minimal request (interpreter, runtime, weights, arenas)
* ``prefill_bytes_per_token``: what each prompt token adds at prefill (activations, logits, KV cache)
* ``vision_bytes_per_tile``: what each tile of one vision-encoder batch adds (the backend's real batch:
  more tiles than ``vision_batch`` reuse the same buffers; only their features add up)

The model is linear; export and ``smoledge doctor --calibrate`` both call this, and the router prefers
the calibration of this device over the export machine's figures.  Run as a module it is the child::

    python -m smoledge.runtime.memory_probe BUNDLE FORMAT PROMPT_TOKENS IMAGE_WxHxCOUNT|- NEW_TOKENS [OPTIONS_JSON]

``options`` are the backend's load options (a device profile's ``backend_options``); export measures with
none, the backend's defaults.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from smoledge.errors import BackendError
from smoledge.runtime.manifest import MeasuredMemory

_MARK = "smoledge-memory-probe:"


@dataclass(frozen=True)
class Probe:
    """One request shape: a text prompt of about ``tokens`` tokens, an optional synthetic image, new tokens."""

    tokens: int
    image: tuple[int, int] | None = None  # (width, height)
    new_tokens: int = 1
    images: int = 1  # copies of ``image`` in the request


@dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    prompt_tokens: int
    tiles: int
    load_rss: int  # bytes resident right after load
    peak_rss: int  # the child's high-water mark, bytes


def probe_set(manifest) -> tuple[Probe, ...]:
    """The calibration shapes: three text prompts (a minimal, a medium and a long one: prefill grows with the
    square of the prompt where attention scores are materialised) and the smallest and largest split photo."""
    image = manifest.image
    long = max(64, min(768, manifest.context_length // 4))
    probes = [Probe(1), Probe(long // 2), Probe(long)]
    edge = image.longest_edge
    if image.do_image_splitting:  # a wide strip is one row of tiles; a square photo the most tiles
        probes += [Probe(1, (edge, max(1, edge // 4))), Probe(1, (edge, edge))]
    else:  # one tile per image: one image, and more images than one encoder batch
        tile = (image.tile_size, image.tile_size)
        probes += [Probe(1, tile), Probe(1, tile, images=6)]
    return tuple(probes)


def measure_memory(bundle: Path, fmt: str, *, vision_batch: int = 4, probes: tuple[Probe, ...] | None = None,
                   timeout_s: float = 300.0, options: dict | None = None) -> MeasuredMemory:
    """The memory figures of ``fmt`` in ``bundle``, from one child process per probe (see the module doc), the
    backend loaded with ``options``."""
    from smoledge.runtime.bundle import open_bundle

    manifest = open_bundle(bundle, verify=False).manifest
    results = [run_probe(bundle, fmt, p, timeout_s=timeout_s, options=options)
               for p in (probes or probe_set(manifest))]
    return fit(results, manifest, vision_batch)


def run_probe(bundle: Path, fmt: str, probe: Probe, *, timeout_s: float = 300.0,
              options: dict | None = None) -> ProbeResult:
    """``probe`` answered by ``fmt`` in a fresh child process, the backend loaded with ``options``."""
    image = f"{probe.image[0]}x{probe.image[1]}x{probe.images}" if probe.image else "-"
    cmd = [sys.executable, "-m", "smoledge.runtime.memory_probe", str(bundle), fmt, str(probe.tokens), image,
           str(probe.new_tokens), json.dumps(options or {})]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BackendError(f"the memory probe of {fmt} took over {timeout_s:g} s",
                           hint="the device is very slow or busy; try again when it is idle") from None
    line = next((x for x in done.stdout.splitlines() if x.startswith(_MARK)), None)
    if done.returncode != 0 or line is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise BackendError(f"the memory probe of {fmt} failed (exit {done.returncode}): {last}",
                           hint="check the bundle with `smoledge bundle verify`")
    data = json.loads(line[len(_MARK):])
    return ProbeResult(probe, int(data["prompt_tokens"]), int(data["tiles"]), int(data["load_rss"]),
                       int(data["peak_rss"]))


def fit(results: list[ProbeResult], manifest, vision_batch: int) -> MeasuredMemory:
    """The linear model of the module doc, fitted exactly on the probes (negative terms are dropped)."""
    import numpy as np

    text = [r for r in results if not r.tiles]
    s = np.array([r.prompt_tokens for r in text], dtype=float)
    fixed, per_token, per_square = _fit_columns([np.ones_like(s), s, s * s], [r.peak_rss for r in text])

    def base(r: ProbeResult) -> float:
        return fixed + per_token * r.prompt_tokens + per_square * r.prompt_tokens ** 2

    images = [r for r in results if r.tiles]
    batch_tile = per_tile = 0.0
    if images:
        t = np.array([r.tiles for r in images], dtype=float)
        columns = [np.minimum(t, vision_batch), t] if len(set(t)) > 1 else [np.minimum(t, vision_batch)]
        batch_tile, per_tile = (*_fit_columns(columns, [r.peak_rss - base(r) for r in images]), 0.0)[:2]
    return MeasuredMemory(
        fixed_bytes=int(fixed), prefill_bytes_per_token=int(per_token),
        attention_bytes_per_token_squared=round(per_square, 3),
        decode_bytes_per_token=2 * manifest.memory.kv_bytes_per_token,
        vision_bytes_per_batch_tile=int(batch_tile), vision_bytes_per_tile=int(per_tile), vision_batch=vision_batch,
        load_bytes=int(min(r.load_rss for r in results)),
        probes=tuple({"prompt_tokens": r.prompt_tokens, "tiles": r.tiles, "new_tokens": r.probe.new_tokens,
                      "peak_bytes": r.peak_rss} for r in results),
    )


def _fit_columns(columns: list, y: list) -> list[float]:
    """Least squares of ``y`` on ``columns`` with every coefficient >= 0 (a negative one is set to 0, refit)."""
    import numpy as np

    keep = list(range(len(columns)))
    y = np.asarray(y, dtype=float)
    while True:
        a = np.stack([columns[i] for i in keep], axis=1)
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        if (coef >= 0).all() or len(keep) == 1:
            out = [0.0] * len(columns)
            for i, c in zip(keep, coef):
                out[i] = max(0.0, float(c))
            return out
        keep.pop(int(np.argmin(coef)))


# --------------------------------------------------------------------------------------------- the child
def _proc_status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` figure (``VmHWM``, ``VmRSS``) in bytes; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """This process's resident high-water mark in bytes.  On Linux from ``VmHWM``: ``ru_maxrss`` would also
    count the parent's RSS at fork time, which Linux carries across ``exec`` into the child's figure."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def current_rss() -> int:
    current = _proc_status_bytes("VmRSS")
    return peak_rss() if current is None else current


def _child(argv: list[str]) -> int:
    from smoledge.runtime import load
    from smoledge.runtime.types import ChatRequest, Message, SamplingConfig

    bundle, fmt, tokens, image, new_tokens, *options = argv
    pipe = load(bundle, fmt, verify=False, **(json.loads(options[0]) if options else {}))
    load_rss = current_rss()
    width, height, count = (0, 0, 0) if image == "-" else map(int, image.split("x"))
    images = [_image(width, height)] * count
    sampling = SamplingConfig(max_new_tokens=int(new_tokens))

    def ask(words: int) -> ChatRequest:
        return ChatRequest((Message.user(" ".join(["word"] * words), images),), sampling)

    one, two = (pipe.measure(ask(n)).prompt_tokens for n in (1, 2))
    chosen = ask(1 + max(0, int(tokens) - one) // max(1, two - one))
    shape = pipe.measure(chosen)
    for _ in pipe.stream(chosen):
        pass
    print(_MARK + json.dumps({"prompt_tokens": shape.prompt_tokens, "tiles": shape.image_tiles,
                              "load_rss": load_rss, "peak_rss": peak_rss()}), flush=True)
    return 0


def _image(width: int, height: int):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
