"""``smoledge bench``: measure bundles side by side with transformers, llama.cpp and onnxruntime-genai.

    smoledge bench [--size realtext|full] [--bundle B ...] [--peers transformers,llamacpp,genai]
                   [--repeats N] [--threads T] [--out DIR] [--quick] [--fidelity | --no-fidelity]

Without ``--bundle`` the default INT4 bundle of the size's model is exported into the smoledge cache;
peers' artifacts (GGUF, genai INT4) are converted there too, once.  ``--size full`` builds the
SmolVLM2-2.2B architecture with random weights first (minutes, ~10 GB of RAM for the export).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smoledge.benchmarks.config import DEFAULT_PEERS, SIZES, BenchSettings, default_formats, default_threads
from smoledge.errors import ConfigError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=SIZES, default="realtext",
                        help="realtext (SmolLM2-135M decoder, fast) or full (SmolVLM2-2.2B shapes, random weights)")
    parser.add_argument("--bundle", action="append", type=Path, default=[], metavar="B",
                        help="a bundle of the size's model to measure (repeatable; default: export INT4 to the cache)")
    parser.add_argument("--formats", default=",".join(default_formats()),
                        help="formats of the default bundle to measure (default: onnx, plus executorch where "
                        "it is installed); ignored with --bundle, whose formats are all measured")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"comma-separated peers ({', '.join(DEFAULT_PEERS)}; '' for none)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 3, --quick 1)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="threads for every subject")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where the results go")
    parser.add_argument("--quick", action="store_true",
                        help="short contexts and few tokens: checks the harness, not for quoting")
    parser.add_argument("--fidelity", action=argparse.BooleanOptionalAction, default=None,
                        help="measure KL / top-1 vs fp32 (default: on at realtext, off at full)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per measured pass")
    parser.add_argument("--profile", default=None, metavar="P",
                        help="also measure each of our bundles with device profile P's backend options "
                        "(e.g. raspberry-pi-5-4gb: the ONNX vision session exclusive), as a second subject")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    from smoledge.benchmarks.peers import PEERS

    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    unknown = [p for p in peers if p not in PEERS or p == "smoledge"]
    if unknown:
        raise ConfigError(f"unknown peer(s) {', '.join(unknown)}", hint=f"choose from {', '.join(DEFAULT_PEERS)}")
    for bundle in args.bundle:
        if not (bundle / "manifest.json").is_file():
            raise ConfigError(f"{bundle} is not a bundle folder (no manifest.json)", hint="give an exported bundle")
    if args.profile:
        from smoledge.cloud_fallback.profiles import load_profile

        load_profile(args.profile)  # an unknown name is a ConfigError before anything is built
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    try:
        return BenchSettings(size=args.size, bundles=tuple(args.bundle), formats=formats, peers=peers,
                             repeats=repeats, threads=args.threads, out=args.out, quick=args.quick,
                             fidelity=args.fidelity, worker_timeout_s=args.timeout, profile=args.profile)
    except ValueError as err:
        raise ConfigError(str(err), hint="see smoledge bench --help") from None


def main(args: argparse.Namespace) -> int:
    from smoledge.benchmarks import report as report_module
    from smoledge.benchmarks.runner import run_bench

    settings = settings_from_args(args)
    report = run_bench(settings)
    paths = report_module.write(report, settings.out)
    print(report_module.markdown(report))
    print("\n".join(report_module.target_lines(report)))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())} in {report['timing']['total_s']:.0f} s")
    return 0
