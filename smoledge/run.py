"""``smoledge run MODEL [PROMPT] [--image IMG]... [--video CLIP]...``: one command from a bundle, a model folder
or a hub id to an answer, like ``ollama run``.

``MODEL`` is a bundle (folder or ``.zip``), a checkpoint folder or a Hub id; a checkpoint is exported once into
the smoledge cache and reused (:mod:`smoledge.model_cache`), a Hub repo holding a bundle is pulled
(:mod:`smoledge.hub`).  The answer streams on a terminal (``--no-stream`` to wait for it whole); sampling
follows :mod:`smoledge.runtime.defaults` (``--temperature 0`` = greedy); ``--stats`` (on by default when
stderr is a terminal) prints the route and llama.cpp-style timings to stderr at the end.
"""

from __future__ import annotations

import argparse
import os
import sys

from smoledge.runtime.formats import add_backend_arguments, backend_options_from_args, resolve_backend


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="MODEL",
                        help="a bundle folder or .zip ('smoledge export'), a checkpoint folder or a Hub id "
                        "(a checkpoint is exported once into the smoledge cache; a Hub bundle is pulled)")
    parser.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help="the question or instruction")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the question or instruction (the same as PROMPT)")
    prompt.add_argument("--prompt-file", metavar="PATH",
                        help="read the prompt from a UTF-8 file ('-' = stdin), for prompts longer than one argument")
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable, in prompt order)")
    parser.add_argument("--video", action="append", default=[],
                        help="video file (repeatable; after the images, before the prompt); needs the video "
                        "extra: pip install -e '.[video]'")
    parser.add_argument("--max-frames", default=os.environ.get("SMOLEDGE_MAX_FRAMES"), metavar="N|auto",
                        help="sample at most N frames per video; 'auto' = the device profile's limit, so a long "
                        "video is downsampled instead of going to the cloud (default $SMOLEDGE_MAX_FRAMES, "
                        "else the bundle's setting)")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="print the answer as it is generated (default: on when stdout is a terminal)")
    add_sampling_arguments(parser)
    add_backend_arguments(parser)
    parser.add_argument("--stats", action=argparse.BooleanOptionalAction, default=None,
                        help="print the route and timings to stderr at the end (default: on when stderr is a "
                        "terminal)")
    parser.add_argument("--verify", choices=["fast", "full"], default=None,
                        help="bundle check before running: 'fast' re-hashes files whose size or mtime changed, "
                        "'full' hashes every file (SD cards, copied bundles); default the device profile's")
    add_source_arguments(parser)
    from smoledge.cloud_fallback import add_routing_arguments

    add_routing_arguments(parser)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling flags of ``run`` and ``chat``; unset ones come from :func:`sampling_from_args`'s defaults."""
    from smoledge.runtime.defaults import CLI

    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default: bundle's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"0 = greedy (default: the checkpoint's generation_config, else {CLI.temperature:g})")
    parser.add_argument("--top-k", type=int, default=None, help=f"0 = off (default {CLI.top_k})")
    parser.add_argument("--top-p", type=float, default=None, help=f"(default {CLI.top_p:g})")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help=f"1 = off (default {CLI.repetition_penalty:g})")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampler (the same answer every run)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """How a checkpoint or Hub id becomes a bundle."""
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of a Hub MODEL")
    from smoledge.quantize.recipe import DEFAULT_RECIPE

    parser.add_argument("--quant", default=None,
                        help=f"recipe for exporting a checkpoint MODEL (default {DEFAULT_RECIPE}); ignored for a "
                        "bundle")


def sampling_from_args(args: argparse.Namespace, manifest):
    """The flags given, else the checkpoint's generation_config, else the CLI defaults (runtime/defaults.py)."""
    from smoledge.errors import ConfigError
    from smoledge.runtime.defaults import CLI, with_flags

    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
             "stop": tuple(args.stop)}
    config = with_flags(manifest.generation, CLI, given)
    if config.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {config.max_new_tokens}")
    if config.temperature < 0 or not 0 < config.top_p <= 1 or config.top_k < 0 or config.repetition_penalty <= 0:
        raise ConfigError("sampling settings out of range",
                          hint="temperature >= 0, 0 < top-p <= 1, top-k >= 0, repetition-penalty > 0")
    return config


def build_request(args: argparse.Namespace, manifest):
    from smoledge.runtime.request_check import check_request
    from smoledge.runtime.types import ChatRequest, ImagePart, Message, TextPart, VideoPart

    messages = [Message("system", (TextPart(args.system),))] if args.system else []
    media = tuple(ImagePart(i) for i in args.image) + tuple(VideoPart(v) for v in args.video)
    messages.append(Message("user", media + (TextPart(prompt_text(args)),)))
    return check_request(ChatRequest(tuple(messages), sampling_from_args(args, manifest)))


MAX_PROMPT_BYTES = 16 * 1024 * 1024


def prompt_text(args: argparse.Namespace) -> str:
    """PROMPT or ``--prompt``, or the UTF-8 text of ``--prompt-file`` (``-``: stdin), at most 16 MiB."""
    from smoledge.errors import ParameterError
    from smoledge.runtime.media import read_file

    given = [name for name, value in (("PROMPT", args.prompt_arg), ("--prompt", args.prompt),
                                      ("--prompt-file", args.prompt_file)) if value is not None]
    if len(given) > 1:
        raise ParameterError(f"{' and '.join(given)} both give the prompt", param=given[1], hint="give one")
    if not given:
        raise ParameterError("no prompt", param="PROMPT",
                             hint="smoledge run MODEL \"your question\", or --prompt-file PATH ('-' = stdin)")
    if args.prompt_file is None:
        return args.prompt if args.prompt is not None else args.prompt_arg
    if args.prompt_file == "-":
        data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
        if len(data) > MAX_PROMPT_BYTES:
            raise ParameterError("the prompt on stdin is over 16 MiB", param="--prompt-file", hint="send less")
    else:
        data = read_file(args.prompt_file, MAX_PROMPT_BYTES, what="prompt", error=ParameterError)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise ParameterError(f"the prompt file is not valid UTF-8 (byte {err.start})", param="--prompt-file",
                             hint="re-save it as UTF-8") from None


def load_pipeline(path, args: argparse.Namespace, *, verify=True, profile=None):
    """The bundle at ``path`` with ``--backend`` (else the first the bundle holds and this machine runs), with
    the device ``profile``'s backend options (the flags win where both set one)."""
    from smoledge.runtime.backends import load_backend
    from smoledge.runtime.bundle import open_bundle
    from smoledge.runtime.pipeline import Pipeline

    bundle = open_bundle(path, verify=verify)
    resolve_backend(args, bundle.manifest.formats, f"bundle {path}")
    options = {**(profile.options_for(args.backend) if profile else {}), **backend_options_from_args(args)}
    return Pipeline(bundle, load_backend(args.backend, bundle, **options))


def main(args: argparse.Namespace) -> int:
    from smoledge import interrupts
    from smoledge.cloud_fallback import answer, format_decision, router_config_from_args
    from smoledge.model_cache import bundle_for
    from smoledge.progress import first_token_wait
    from smoledge.redact import redact
    from smoledge.runtime.request_check import check_threads
    from smoledge.runtime.video import resolve_max_frames

    check_threads(args.threads)
    config = router_config_from_args(args)
    verify = args.verify or config.profile.bundle_verify
    pipe = load_pipeline(bundle_for(args.bundle, revision=args.revision, quant=args.quant, backend=args.backend),
                         args, verify=verify, profile=config.profile)
    pipe.set_video_max_frames(resolve_max_frames(args.max_frames, config.profile.max_video_frames))
    request = build_request(args, pipe.manifest)
    stats = args.stats if args.stats is not None else sys.stderr.isatty()
    stream = args.stream if args.stream is not None else sys.stdout.isatty()

    def show(decision) -> None:
        if stats or decision.route == "cloud":  # a refusal is raised as the error itself
            print(redact(format_decision(decision)), file=sys.stderr, flush=True)

    pieces = []
    result = answer(request, pipe, config=config, on_decision=show)
    with interrupts.deferred():  # Ctrl-C stops between decoder steps, not inside onnxruntime
        try:
            with first_token_wait(result, request) as wait:  # a video: what is decoded before the first token
                for chunk in result:
                    wait.close()
                    if result.decision.route == "cloud":  # local chunks: the worker stops between its steps
                        interrupts.check()
                    pieces.append(chunk.text)
                    if stream and chunk.text:
                        print(chunk.text, end="", flush=True)
        except KeyboardInterrupt:
            if stream and "".join(pieces):
                interrupts.end_line()
            raise
    print("" if stream else "".join(pieces).strip())
    if stats and result.decision.route == "local":  # the engine that answered: fewer tiles is a view of pipe
        print(timings(result.engine.last_stats, args.backend), file=sys.stderr)
    return 0


def timings(s, backend: str) -> str:
    """llama.cpp's closing lines (``llama_perf_context_print``): prompt eval and eval, ms per token, tokens/s."""
    prompt_s = max(s.time_to_first_token_s, 1e-9)
    decode_n = max(s.completion_tokens - 1, 0)
    decode_s = max(s.total_s - s.time_to_first_token_s, 1e-9)

    def line(name: str, n: int, seconds: float, unit: str) -> str:
        per = f"{seconds * 1e3 / n:8.2f} ms per token, {n / seconds:8.2f} tokens per second" if n else "-"
        return f"{name:>12} = {seconds * 1e3:10.2f} ms / {n:5d} {unit} ({per})"

    return "\n".join([
        f"[{backend}: {s.prompt_tokens} prompt tokens, {s.image_tiles} tiles, {s.completion_tokens} new tokens]",
        line("prompt eval", s.prompt_tokens, prompt_s, "tokens"),
        line("eval", decode_n, decode_s, "runs  "),
        f"{'total time':>12} = {s.total_s * 1e3:10.2f} ms / {s.prompt_tokens + s.completion_tokens:5d} tokens",
    ])
