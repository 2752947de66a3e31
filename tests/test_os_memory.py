"""What the ONNX backend hands back to the system (runtime/backends/os_memory.py, issue 14 "Memory"): the mapped
pages of a loaded graph's external data (MatMulNBits' scales and zero points stay mapped beside their packed
copies), and the C heap's free pages after an exclusive-mode session is freed.

Each case runs in a fresh child process, so the figures are that process's own; Linux only (/proc, madvise,
glibc), which CI is."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")

_CHILD = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from smoledge.runtime import load
    from smoledge.runtime.types import ChatRequest, Message, SamplingConfig

    bundle, options = sys.argv[1], json.loads(sys.argv[2])
    data = {os.path.realpath(p) for p in __import__("glob").glob(os.path.join(bundle, "onnx", "*.data"))}

    def mapped_kib():  # resident KiB of this process's mappings of the bundle's .data files
        total, current = 0, False
        for line in open("/proc/self/smaps"):
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                current = len(head) == 6 and head[5] in data
            elif current and head[0] == "Rss:":
                total += int(head[1])
        return total

    def rss_kib():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))

    pipe = load(bundle, verify=False, **options)
    figures = {"mapped_after_load": mapped_kib(), "rss_after_load": rss_kib()}
    request = ChatRequest((Message.user("What is the capital of France? Answer in one sentence."),),
                          SamplingConfig(max_new_tokens=12))
    chunks = list(pipe.stream(request))
    figures["tokens"] = [c.token_id for c in chunks]
    figures["text"] = "".join(c.text for c in chunks)
    if options.get("vision_session") == "exclusive":
        side = pipe.image_config.tile_size
        pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, side, side)).astype(np.float32)
        pipe.backend.encode_images(pixels, np.ones((1, side, side), dtype=bool))
        figures["rss_after_exclusive_encode"] = rss_kib()
        figures["sessions_after_encode"] = sorted(pipe.backend.sessions)
    print("FIGURES" + json.dumps(figures))
""")


def _child(bundle, **options) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(bundle), json.dumps(options)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("FIGURES"))
    return json.loads(line[len("FIGURES"):])


def _data_bytes(bundle, graph: str) -> int:
    return sum(p.stat().st_size for p in (bundle / "onnx").glob(f"{graph}*.data"))


def test_a_loaded_bundle_keeps_none_of_its_external_data_resident_and_answers_the_same(realtext_int4_bundle):
    """With the default (release_mapped_pages on) the bundle's mapped .data pages are handed back after load;
    with it off the scales and zero points stay resident (at least 2% of the decoder's data here). The answer
    is the same either way: a later read faults a page back in from the file."""
    released = _child(realtext_int4_bundle)
    kept = _child(realtext_int4_bundle, release_mapped_pages=False)
    decoder_kib = _data_bytes(realtext_int4_bundle, "decoder") / 1024
    assert kept["mapped_after_load"] > 0.02 * decoder_kib, kept
    assert released["mapped_after_load"] < 0.1 * kept["mapped_after_load"], (released, kept)
    assert released["rss_after_load"] < kept["rss_after_load"]
    assert released["tokens"] == kept["tokens"] and "Paris" in released["text"]


def test_an_exclusive_encode_hands_the_freed_sessions_pages_back(realtext_int4_bundle):
    """vision_session="exclusive": after the encode both the decoder's and the vision encoder's sessions are
    gone, and their freed memory is no longer in the process (trimmed from the C heap): the process holds less
    than after load by at least half the decoder's data (without the trim, glibc kept the freed chunks: 647 MB
    after the encode at full size instead of 101)."""
    figures = _child(realtext_int4_bundle, vision_session="exclusive")
    assert figures["sessions_after_encode"] == ["embed_tokens"]
    decoder_kib = _data_bytes(realtext_int4_bundle, "decoder") / 1024
    assert figures["rss_after_exclusive_encode"] < figures["rss_after_load"] - 0.5 * decoder_kib, figures
