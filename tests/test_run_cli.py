"""`smoledge run`'s command line: a positional prompt, streaming on a terminal, llama.cpp-style timings, the
backend picked from the bundle, --providers by short name, and export's one --context flag."""

from __future__ import annotations

import sys

import pytest

from conftest import PARIS_QUESTION, run_cli
from smoledge.cli import build_parser, main

GREEDY = ["--temperature", "0", "--max-new-tokens", "6", "--no-cloud"]


class Terminal:
    """A stand-in for a terminal stream: says it is a tty and records each write."""

    def __init__(self):
        self.writes: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.writes)


def test_positional_prompt_answers_as_prompt_does(tiny_int4_bundle, capsys):
    assert main(["run", str(tiny_int4_bundle), PARIS_QUESTION, *GREEDY]) == 0
    positional = capsys.readouterr().out
    assert main(["run", str(tiny_int4_bundle), "--prompt", PARIS_QUESTION, *GREEDY]) == 0
    assert capsys.readouterr().out == positional and positional.strip()


@pytest.mark.parametrize("argv, needle", [([], "error: no prompt ("),
                                          (["hi", "--prompt", "hi"], "error: PROMPT and --prompt both give the prompt "
                                           "(give one)\n")])  # the JS CLI's test checks the same messages
def test_no_prompt_or_two_prompts_is_one_line(tiny_int4_bundle, capsys, argv, needle):
    assert main(["run", str(tiny_int4_bundle), *argv, "--no-cloud"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_streams_on_a_terminal_and_not_with_no_stream(tiny_int4_bundle, capsys, monkeypatch):
    argv = ["run", str(tiny_int4_bundle), "Tell me about the sea.", "--temperature", "0", "--max-new-tokens", "24",
            "--no-cloud"]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(argv) == 0
    streamed = [w for w in terminal.writes if w.strip()]
    assert len(streamed) > 1  # chunk by chunk
    whole = Terminal()
    monkeypatch.setattr(sys, "stdout", whole)
    assert main([*argv, "--no-stream"]) == 0
    assert len([w for w in whole.writes if w.strip()]) == 1
    assert whole.text().strip() == terminal.text().strip()
    monkeypatch.undo()
    assert main(argv) == 0  # a pipe: the whole answer at the end
    assert capsys.readouterr().out.strip() == whole.text().strip()


def test_timings_print_at_the_end_on_a_terminal(tiny_int4_bundle, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert main(["run", str(tiny_int4_bundle), "hi", *GREEDY]) == 0
    err = sys.stderr.text()
    assert "[onnx: " in err and " new tokens]" in err
    for name in ("prompt eval =", "eval =", "total time ="):
        assert name in err and "ms" in err, err
    assert "tokens per second" in err
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert main(["run", str(tiny_int4_bundle), "hi", *GREEDY, "--no-stats"]) == 0
    assert "prompt eval" not in sys.stderr.text()


def test_the_backend_follows_the_bundle():
    from smoledge.errors import BackendUnavailableError
    from smoledge.runtime.formats import pick_backend

    assert pick_backend(("coreml", "onnx")) == "onnx"
    if sys.platform != "darwin":
        with pytest.raises(BackendUnavailableError, match=r"holds coreml.*pip install -e '\.\[coreml\]'"):
            pick_backend(("coreml",))
    args = build_parser().parse_args(["run", "b/", "hi"])
    assert args.backend is None  # chosen once the bundle is open


def test_a_bundle_runs_without_backend_and_says_which(tiny_int4_bundle, capsys):
    assert main(["run", str(tiny_int4_bundle), "hi", *GREEDY, "--stats"]) == 0
    assert "[onnx: " in capsys.readouterr().err


def test_providers_take_short_names_in_any_case():
    from smoledge.runtime.formats import parse_providers

    assert parse_providers("CUDA, cpu,TensorRT") == ("CUDAExecutionProvider", "CPUExecutionProvider",
                                                      "TensorrtExecutionProvider")
    assert parse_providers("MyExecutionProvider") == ("MyExecutionProvider",)


@pytest.mark.parametrize("name, package", [("CUDA", "onnxruntime-gpu"), ("coreml", "macOS"),
                                           ("nnapi", "onnxruntime-android")])
def test_a_missing_provider_names_the_package_that_brings_it(name, package):
    from smoledge.errors import BackendUnavailableError
    from smoledge.runtime.formats import parse_providers

    with pytest.raises(BackendUnavailableError) as info:
        parse_providers(name, available=["CPUExecutionProvider"])
    assert package in str(info.value) and "ExecutionProvider" in str(info.value)


def test_a_missing_provider_through_the_cli_is_one_line(tiny_int4_bundle):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    res = run_cli("run", str(tiny_int4_bundle), "hi", "--providers", "CUDA", "--no-cloud")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "CUDAExecutionProvider" in res.stderr and "onnxruntime-gpu" in res.stderr and "Jetson" in res.stderr


def test_export_has_one_context_flag_and_the_old_ones_still_work(tmp_path, capsys):
    from smoledge.export.cli import target_options

    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["export"].format_help()
    assert "--context" in help_text and "--max-context-len" not in help_text and "--coreml-context" not in help_text
    args = parser.parse_args(["export", "m/", "--out", str(tmp_path / "b"), "--context", "512"])
    options = target_options(args, ("executorch", "coreml"))
    assert options["executorch"].max_context_len == 512 and options["coreml"].context == 512
    assert capsys.readouterr().err == ""
    args = parser.parse_args(["export", "m/", "--out", str(tmp_path / "b"), "--max-context-len", "64"])
    options = target_options(args, ("executorch", "coreml"))
    assert options["executorch"].max_context_len == 64 and options["coreml"].context == 2048
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-context-len is deprecated; use --context" in err
    args = parser.parse_args(["export", "m/", "--out", str(tmp_path / "b"), "--context", "full"])
    assert target_options(args, ("coreml",))["coreml"].context is None
