"""``smoledge run BUNDLE [--image IMG]... [--video CLIP]... --prompt TEXT [--stream]``."""

from __future__ import annotations

import argparse
import os
import sys

from smoledge.runtime.formats import add_backend_arguments, backend_options_from_args


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder or .zip written by 'smoledge export'")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the question or instruction")
    prompt.add_argument("--prompt-file", metavar="PATH",
                        help="read the prompt from a UTF-8 file ('-' = stdin), for prompts longer than one argument")
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable, in prompt order)")
    parser.add_argument("--video", action="append", default=[],
                        help="video file (repeatable; after the images, before the prompt); needs smoledge[video]")
    parser.add_argument("--max-frames", default=os.environ.get("SMOLEDGE_MAX_FRAMES"), metavar="N|auto",
                        help="sample at most N frames per video; 'auto' = the device profile's limit, so a long "
                        "video is downsampled instead of going to the cloud (default $SMOLEDGE_MAX_FRAMES, "
                        "else the bundle's setting)")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default: bundle's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_backend_arguments(parser)
    parser.add_argument("--stats", action="store_true", help="print the route and timing figures to stderr")
    parser.add_argument("--verify", choices=["fast", "full"], default=None,
                        help="bundle check before running: 'fast' re-hashes files whose size or mtime changed, "
                        "'full' hashes every file (SD cards, copied bundles); default the device profile's")
    from smoledge.cloud_fallback import add_routing_arguments

    add_routing_arguments(parser)


def build_request(args: argparse.Namespace, manifest):
    from smoledge.errors import ConfigError
    from smoledge.runtime.request_check import check_request
    from smoledge.runtime.types import ChatRequest, ImagePart, Message, SamplingConfig, TextPart, VideoPart

    max_new = args.max_new_tokens if args.max_new_tokens is not None else manifest.generation.max_new_tokens
    if max_new < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.repetition_penalty <= 0:
        raise ConfigError("sampling settings out of range",
                          hint="temperature >= 0, 0 < top-p <= 1, top-k >= 0, repetition-penalty > 0")
    messages = [Message("system", (TextPart(args.system),))] if args.system else []
    media = tuple(ImagePart(i) for i in args.image) + tuple(VideoPart(v) for v in args.video)
    messages.append(Message("user", media + (TextPart(prompt_text(args)),)))
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                              stop=tuple(args.stop))
    return check_request(ChatRequest(tuple(messages), sampling))


MAX_PROMPT_BYTES = 16 * 1024 * 1024


def prompt_text(args: argparse.Namespace) -> str:
    """``--prompt``, or the UTF-8 text of ``--prompt-file`` (``-``: stdin), at most 16 MiB."""
    from smoledge.errors import ParameterError
    from smoledge.runtime.media import read_file

    if args.prompt_file is None:
        return args.prompt
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


def main(args: argparse.Namespace) -> int:
    from smoledge import interrupts
    from smoledge.cloud_fallback import answer, format_decision, router_config_from_args
    from smoledge.progress import first_token_wait
    from smoledge.redact import redact
    from smoledge.runtime.pipeline import Pipeline
    from smoledge.runtime.video import resolve_max_frames

    from smoledge.runtime.request_check import check_threads

    check_threads(args.threads)
    config = router_config_from_args(args)
    verify = args.verify or config.profile.bundle_verify
    pipe = Pipeline.load(args.bundle, args.backend, verify=verify, **backend_options_from_args(args))
    pipe.set_video_max_frames(resolve_max_frames(args.max_frames, config.profile.max_video_frames))
    request = build_request(args, pipe.manifest)

    def show(decision) -> None:
        if args.stats or decision.route == "cloud":  # a refusal is raised as the error itself
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
                    if args.stream and chunk.text:
                        print(chunk.text, end="", flush=True)
        except KeyboardInterrupt:
            if args.stream and "".join(pieces):
                interrupts.end_line()
            raise
    print("" if args.stream else "".join(pieces).strip())
    if args.stats and result.decision.route == "local":
        s = pipe.last_stats
        rate = (s.completion_tokens - 1) / max(s.total_s - s.time_to_first_token_s, 1e-9)
        print(f"[{args.backend}: {s.prompt_tokens} prompt tokens, {s.image_tiles} tiles, "
              f"{s.completion_tokens} new tokens; first token {s.time_to_first_token_s:.2f} s, "
              f"{rate:.1f} tok/s]", file=sys.stderr)
    return 0
