"""Does a GPU execution provider give the CPU's answer, and how fast?  (benchmarks/device_check.sh)

    python -m smoledge.benchmarks.device_check --bundle tiny=DIR --bundle realtext=DIR [--provider cuda]

For each bundle: the same greedy request (text, and an image for the tiny bundle) on the CPU provider and
on ``--provider`` (with CPU as onnxruntime's fallback for nodes the GPU provider lacks).  Records the
answers, the first token where they part (None when identical), which providers the sessions really got,
and time to first token / decode speed beside them, as JSON.  Exit 1 when a greedy answer differs or the
GPU provider was not really used; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PARIS = "What is the capital of France? Answer in one sentence."
DESCRIBE = "Describe this image in one sentence."
IMAGE = Path(__file__).resolve().parents[1] / "examples" / "house.png"


@dataclass
class Answer:
    text: str
    tokens: list[int]
    providers: list[str]  # what the decoder session really runs on
    load_s: float
    time_to_first_token_s: float
    decode_tokens_per_s: float


def ask(bundle: Path, providers: tuple[str, ...], prompt: str, images: tuple[Path, ...], max_new: int) -> Answer:
    from smoledge.runtime.pipeline import Pipeline
    from smoledge.runtime.types import ChatRequest, Message, SamplingConfig

    start = time.perf_counter()
    pipe = Pipeline.load(bundle, "onnx", providers=providers)
    load_s = time.perf_counter() - start
    request = ChatRequest((Message.user(prompt, [str(i) for i in images]),), SamplingConfig(max_new_tokens=max_new))
    pipe.generate(request)  # warm-up: kernels, CUDA graphs, allocator arenas
    chunks = list(pipe.stream(request))
    stats = pipe.last_stats
    decode_s = stats.total_s - stats.time_to_first_token_s
    return Answer(text="".join(c.text for c in chunks), tokens=[c.token_id for c in chunks if c.token_id is not None],
                  providers=list(pipe.backend.sessions["decoder"].get_providers()), load_s=load_s,
                  time_to_first_token_s=stats.time_to_first_token_s,
                  decode_tokens_per_s=(len(chunks) - 1) / decode_s if decode_s > 0 and len(chunks) > 1 else 0.0)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two greedy answers part; None when they are the same."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(name: str, bundle: Path, provider: str, prompt: str, images: tuple[Path, ...], max_new: int) -> dict:
    cpu = ask(bundle, ("CPUExecutionProvider",), prompt, images, max_new)
    gpu = ask(bundle, tuple(dict.fromkeys((provider, "CPUExecutionProvider"))), prompt, images, max_new)
    return {"bundle": name, "path": str(bundle), "prompt": prompt, "images": [str(i) for i in images],
            "identical": cpu.text == gpu.text, "first_difference": first_difference(cpu.tokens, gpu.tokens),
            "gpu_provider_used": gpu.providers[0] == provider, "cpu": asdict(cpu), "gpu": asdict(gpu)}


def environment() -> dict:
    import onnxruntime as ort

    return {"machine": platform.machine(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "onnxruntime_device": ort.get_device(), "available_providers": ort.get_available_providers(),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def summary(result: dict) -> str:
    lines = [f"{result['environment']['date']}  onnxruntime {result['environment']['onnxruntime']}  "
             f"provider {result['provider']}",
             "| bundle | prompt | same answer | first difference | provider used | cpu tok/s | gpu tok/s | "
             "cpu ttft s | gpu ttft s |", "|---|---|---|---|---|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['bundle']} | {'image' if c['images'] else 'text'} | {c['identical']} | "
                     f"{c['first_difference']} | {c['gpu_provider_used']} | {c['cpu']['decode_tokens_per_s']:.1f} | "
                     f"{c['gpu']['decode_tokens_per_s']:.1f} | {c['cpu']['time_to_first_token_s']:.3f} | "
                     f"{c['gpu']['time_to_first_token_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from smoledge.errors import SmolEdgeError
    from smoledge.runtime.backends.onnx import provider_names

    parser = argparse.ArgumentParser(prog="device_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", action="append", required=True, metavar="NAME=DIR",
                        help="a bundle to check (repeatable); NAME 'tiny' also gets an image prompt")
    parser.add_argument("--provider", default="cuda", help="short or full onnxruntime provider name")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args(argv)
    provider = provider_names([args.provider])[0]
    checks = []
    try:
        for item in args.bundle:
            name, _, path = item.partition("=")
            if not path:
                parser.error(f"--bundle wants NAME=DIR, got {item!r}")
            checks.append(compare(name, Path(path), provider, PARIS, (), args.max_new_tokens))
            if name == "tiny":
                checks.append(compare(name, Path(path), provider, DESCRIBE, (IMAGE,), args.max_new_tokens))
    except SmolEdgeError as err:
        print(f"device_check: {err}", file=sys.stderr)
        return 1
    result = {"provider": provider, "environment": environment(), "checks": checks}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    return 0 if all(c["identical"] and c["gpu_provider_used"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
