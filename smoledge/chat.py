"""``smoledge chat BUNDLE``: a multi-turn chat on the terminal (or on piped stdin, one turn a line).

Each line is a user turn; the answer streams as it is generated.  Lines starting with ``/`` are commands::

    /image PATH [QUESTION]   attach an image (quote a PATH with spaces); with a QUESTION, ask it now,
                             else the image goes with the next turn
    /reset                   start a new conversation
    /help                    this list
    /exit, /quit             end (so does end of input, Ctrl-D)

Follow-up turns reuse the conversation's KV cache and image features
(:class:`smoledge.runtime.conversation.Conversation`): what was already said, and every image already
seen, is not run through the model again.  The chat runs on this device only (no cloud fallback: the
conversation's state lives here).  Sampling flags are ``run``'s; greedy with ``--temperature 0``.
A turn that fails (an unreadable image, a conversation over the context window) prints its one-line
error and the chat goes on; the exit status is then 1.  Ctrl-C ends the chat (exit 130).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from smoledge.errors import ConfigError, SmolEdgeError
from smoledge.run import add_sampling_arguments, sampling_from_args
from smoledge.runtime.formats import add_backend_arguments

HELP = """commands:
  /image PATH [QUESTION]  attach an image (quote a PATH with spaces); with a QUESTION, ask it now
  /reset                  start a new conversation
  /help                   this list
  /exit, /quit            end (or Ctrl-D)"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder or .zip written by 'smoledge export'")
    parser.add_argument("--image", action="append", default=[], help="image for the first turn (repeatable)")
    parser.add_argument("--system", help="a system message")
    add_sampling_arguments(parser)  # run's flags and defaults (per turn)
    add_backend_arguments(parser)
    parser.add_argument("--stats", action="store_true", help="print each turn's token and timing figures to stderr")


def parse_line(line: str) -> tuple[str, list[str], str]:
    """``(command, image paths, text)`` of one input line; command is "" for a plain turn."""
    stripped = line.strip()
    if not stripped.startswith("/"):
        return "", [], stripped
    name, _, rest = stripped.partition(" ")
    if name != "/image":
        return name, [], rest.strip()
    try:
        words = shlex.split(rest)
    except ValueError as err:
        raise ConfigError(f"cannot read the /image line ({err})", hint='quote a path with spaces: /image "my cat.png"')
    if not words:
        raise ConfigError("/image needs a path", hint="/image PATH [QUESTION]")
    return "/image", [words[0]], " ".join(words[1:])


class ChatSession:
    """The terminal loop: reads lines, prints answers; ``out`` is stdout, ``err`` stderr."""

    def __init__(self, conversation, args: argparse.Namespace, out=sys.stdout, err=sys.stderr):
        self.conv, self.args, self.out, self.err = conversation, args, out, err
        self.pending: list[str] = list(args.image)
        self.failed = False
        self.interactive = sys.stdin.isatty()

    def run(self, lines) -> int:
        from smoledge import interrupts

        if self.interactive:
            print(f"smoledge chat: {Path(self.args.bundle).resolve().name} (/help for commands, Ctrl-D to end)",
                  file=self.err, flush=True)
        while True:
            try:
                line = self._read(lines)
            except KeyboardInterrupt:
                if self.interactive:
                    interrupts.end_line(self.out)
                raise
            if not line or not self.handle(line):
                return 1 if self.failed else 0

    def _read(self, lines) -> str:
        """The next line ("" at the end); on a terminal with a ``>>>`` prompt and line editing."""
        if not self.interactive:
            return lines.readline()
        try:
            import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
        except ImportError:
            pass
        try:
            return input(">>> ") + "\n"
        except EOFError:
            print(file=self.out, flush=True)
            return ""

    def handle(self, line: str) -> bool:
        """Act on one line; False to end the chat."""
        try:
            command, images, text = parse_line(line)
        except SmolEdgeError as err:
            return self._error(err)
        if command in ("/exit", "/quit"):
            return False
        if command == "/help":
            print(HELP, file=self.err, flush=True)
        elif command == "/reset":
            self.conv.reset()
            self.pending = []
            print("[new conversation]", file=self.err, flush=True)
        elif command == "/image":
            self.pending += images
            if text:
                self.turn(text)
            else:
                print(f"[image {images[0]} goes with the next turn]", file=self.err, flush=True)
        elif command:
            return self._error(ConfigError(f"unknown command {command}", hint="/help lists them"))
        elif text:
            self.turn(text)
        return True

    def turn(self, text: str) -> None:
        from smoledge import interrupts

        images, self.pending, printed = self.pending, [], False
        try:
            with interrupts.deferred():  # Ctrl-C stops between decoder steps, not inside the backend
                for chunk in self.conv.ask(text, images):
                    interrupts.check()
                    if chunk.text:
                        self.out.write(chunk.text)
                        self.out.flush()
                        printed = True
        except KeyboardInterrupt:
            if printed:
                interrupts.end_line(self.out)
            raise
        except SmolEdgeError as err:
            if printed:
                interrupts.end_line(self.out)
            self._error(err)
            return
        print(file=self.out, flush=True)
        if self.args.stats:
            s = self.conv.last_turn
            rate = (s.completion_tokens - 1) / max(s.total_s - s.time_to_first_token_s, 1e-9)
            print(f"[{s.prompt_tokens} prompt tokens ({s.reused_tokens} already in the cache), {s.images_encoded} "
                  f"images encoded, {s.completion_tokens} new tokens; first token {s.time_to_first_token_s:.2f} s, "
                  f"{rate:.1f} tok/s]", file=self.err, flush=True)

    def _error(self, err: SmolEdgeError) -> bool:
        from smoledge.redact import redact

        self.failed = True
        print(f"smoledge chat: error: {redact(str(err))}", file=self.err, flush=True)
        return True


def main(args: argparse.Namespace) -> int:
    from smoledge.runtime.conversation import Conversation
    from smoledge.run import load_pipeline
    from smoledge.runtime.request_check import check_threads

    check_threads(args.threads)
    pipe = load_pipeline(args.bundle, args)  # --backend, else what the bundle holds and this machine runs
    conversation = Conversation(pipe, system=args.system, sampling=sampling_from_args(args, pipe.manifest))
    return ChatSession(conversation, args).run(sys.stdin)
