"""The ``smoledge`` console command.

Each subcommand is a library function plus a parser, living in its own module that exposes
``configure_parser(parser)`` and ``main(args) -> int``.  Command modules import heavy libraries (torch,
transformers) inside ``main`` only, so ``smoledge run`` stays light.  A new subcommand is one line in
``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from smoledge import __version__, interrupts
from smoledge.errors import SmolEdgeError
from smoledge.redact import redact

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("smoledge.export.cli", "export a SmolVLM checkpoint to a phone-ready bundle"),
    "demo-model": ("smoledge.export.demo_models", "build an offline demo model (real-text or tiny)"),
    "run": ("smoledge.run", "answer a prompt (with images) from a bundle, a model folder or a Hub id"),
    "chat": ("smoledge.chat", "chat with a bundle over several turns (images allowed) on the terminal"),
    "bundle": ("smoledge.bundle_cli", "verify or describe a bundle"),
    "fidelity": ("smoledge.fidelity", "compare a quantized bundle against fp32"),
    "doctor": ("smoledge.doctor", "show what this device can run; calibrate its speed"),
    "usage": ("smoledge.usage", "print the cloud usage ledger"),
    "serve": ("smoledge.serve", "serve a bundle over an OpenAI-compatible HTTP API"),
    "bench": ("smoledge.benchmarks.cli", "measure bundles side by side with transformers and llama.cpp"),
    "cache": ("smoledge.cache_cli", "show what the smoledge cache holds, or prune it"),
    "pull": ("smoledge.pull_cli", "download a pre-built bundle from the Hugging Face Hub"),
    "push": ("smoledge.push_cli", "upload a bundle to the Hugging Face Hub"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoledge", description="SmolVLM on the edge, with a cloud fallback.")
    parser.add_argument("--version", action="version", version=f"smoledge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a command whose module is not installed in this build
            continue
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        module.configure_parser(cmd)
        cmd.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with interrupts.recorded():  # Ctrl-C stays an interrupt even where a library turns it into its own error
        try:
            return int(args._main(args) or 0)
        except SmolEdgeError as err:
            if args.debug:
                raise
            if interrupts.requested():
                return _interrupted(args)
            print(f"smoledge {args.command}: error: {redact(str(err))}", file=sys.stderr)
            return err.exit_code
        except KeyboardInterrupt:
            if args.debug:
                raise
            return _interrupted(args)
        except MemoryError:
            if args.debug:
                raise
            print(f"smoledge {args.command}: error: out of memory (try a smaller image or model)", file=sys.stderr)
            return 3
        except Exception:
            if interrupts.requested() and not args.debug:
                return _interrupted(args)
            raise


def _interrupted(args: argparse.Namespace) -> int:
    print(f"smoledge {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
