"""``smoledge chat`` and :class:`smoledge.runtime.conversation.Conversation`: follow-up turns reuse the KV cache
and the image features, and answer exactly as a from-scratch run of the whole conversation does (greedy)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import PARIS_QUESTION, REPO, synthetic_image
from smoledge.runtime.types import ChatRequest, SamplingConfig

GREEDY = SamplingConfig(max_new_tokens=12)


def _tokens(chunks) -> list[int]:
    return [c.token_id for c in chunks]


def _fresh_tokens(pipe, conversation) -> list[int]:
    """The last answer's tokens from a from-scratch run of the conversation up to its last user turn."""
    return _tokens(pipe.stream(ChatRequest(tuple(conversation.messages[:-1]), GREEDY)))


def _teacher_forced_gaps(pipe, messages, tokens: list[int]) -> list[float]:
    """A from-scratch run of ``messages`` fed ``tokens``: how far each token's logit is below the best (0: the
    greedy pick)."""
    import numpy as np

    prepared = pipe.prepare(ChatRequest(tuple(messages), GREEDY))
    cache = pipe.backend.new_cache(prepared.input_ids.shape[1] + len(tokens))
    logits = pipe.backend.step(pipe.prompt_embeds(prepared), cache)
    gaps = []
    for token in tokens:
        gaps.append(float(logits.max() - logits[token]))
        logits = pipe.backend.step(pipe.backend.embed(np.array([[token]], dtype=np.int64)), cache)
    return gaps


@pytest.fixture(scope="module")
def realtext_pipe(realtext_int4_bundle):
    from smoledge.runtime import load

    return load(realtext_int4_bundle)


def test_a_follow_up_turn_extends_the_cache_and_answers_as_a_fresh_run(realtext_pipe):
    from smoledge.runtime.conversation import Conversation

    conv = Conversation(realtext_pipe, sampling=GREEDY)
    first = list(conv.ask(PARIS_QUESTION))
    assert "Paris" in "".join(c.text for c in first)
    turn1 = conv.last_turn
    second = _tokens(conv.ask("And what is the capital of Italy?"))
    # the template renders turn 1 + its answer as turn 2's prefix: the whole of it is already in the cache
    # (turn 1's prompt and every answer token but the last, which was sampled and never fed back)
    assert conv.last_turn.reused_tokens == turn1.prompt_tokens + turn1.completion_tokens - 1
    assert conv.last_turn.prompt_tokens > conv.last_turn.reused_tokens
    # int4 kernels round a one-token decode step and a many-token prefill differently (the cached answer was
    # decoded, a fresh run prefills it), so near-ties may break the other way: teacher-forced, every token is a
    # fresh run's greedy pick or within 0.25 logits of it, and most are exactly its pick (under 0.15 on the AVX-512
    # CPUs it was written on, 0.179 on an AVX2-only EPYC, whose int8 kernels round differently)
    gaps = _teacher_forced_gaps(realtext_pipe, conv.messages[:-1], second)
    assert max(gaps) < 0.25 and sum(g > 0 for g in gaps) <= 2, gaps
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.messages[1].content[0].text == "".join(c.text for c in first)


def test_an_image_is_encoded_once_in_a_conversation(tiny_fp32_bundle):
    from smoledge.runtime import load
    from smoledge.runtime.conversation import Conversation

    pipe = load(tiny_fp32_bundle)
    calls = []
    encode = pipe.backend.encode_images

    def counting_encode(pixel_values, mask):
        calls.append(len(pixel_values))
        return encode(pixel_values, mask)

    pipe.backend.encode_images = counting_encode
    conv = Conversation(pipe, system="Answer briefly.", sampling=GREEDY)
    list(conv.ask("What is in the picture?", images=[synthetic_image(500, 380)]))
    assert len(calls) == 1 and conv.last_turn.images_encoded == 1
    second = _tokens(conv.ask("And its colours?"))
    assert len(calls) == 1 and conv.last_turn.images_encoded == 0  # turn 2 encodes nothing again
    third = _tokens(conv.ask("Compare the two.", images=[synthetic_image(64, 64, seed=3)]))
    assert len(calls) == 2  # only the new image
    tiles = sum(calls)
    calls.clear()
    assert third == _fresh_tokens(pipe, conv) and calls == [tiles]  # a fresh run encodes both
    conv.messages.pop(), conv.messages.pop()
    assert second == _fresh_tokens(pipe, conv)


def test_a_conversation_past_the_context_window_is_refused_and_keeps_its_state(tiny_fp32_bundle):
    from smoledge.errors import PromptTooLongError
    from smoledge.runtime import load
    from smoledge.runtime.conversation import Conversation

    pipe = load(tiny_fp32_bundle)
    conv = Conversation(pipe, sampling=SamplingConfig(max_new_tokens=4))
    list(conv.ask("hello"))
    with pytest.raises(PromptTooLongError, match="/reset"):
        list(conv.ask("x " * pipe.context_length))
    assert len(conv.messages) == 2  # the refused turn did not join the conversation
    list(conv.ask("again"))
    assert conv.last_turn.prompt_tokens > 0 and len(conv.messages) == 4


def test_parse_line():
    from smoledge.chat import parse_line
    from smoledge.errors import ConfigError

    assert parse_line("  hello there \n") == ("", [], "hello there")
    assert parse_line('/image "my cat.png" what is it?') == ("/image", ["my cat.png"], "what is it?")
    assert parse_line("/image cat.png") == ("/image", ["cat.png"], "")
    assert parse_line("/reset") == ("/reset", [], "")
    with pytest.raises(ConfigError):
        parse_line("/image")
    with pytest.raises(ConfigError):
        parse_line('/image "unclosed')


def test_chat_cli_on_piped_stdin(realtext_int4_bundle, tmp_path):
    image = tmp_path / "pic.png"
    synthetic_image(64, 64).save(image)
    turns = [PARIS_QUESTION, "/image /no/such/picture.png what is it?", f"/image {image}", "/bogus",
             "Describe the picture in one sentence.", "/reset", "/exit", "never asked"]
    proc = subprocess.run([sys.executable, "-m", "smoledge.cli", "chat", str(realtext_int4_bundle), "--stats",
                           "--max-new-tokens", "12", "--temperature", "0"], input="\n".join(turns) + "\n",
                          capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1, proc.stderr  # two turns failed, the chat went on
    answers = proc.stdout.splitlines()
    assert len(answers) == 2 and "Paris" in answers[0], proc.stdout
    err = proc.stderr.splitlines()
    assert "smoledge chat: error: cannot read image file /no/such/picture.png: not found (check the path)" in err
    assert "smoledge chat: error: unknown command /bogus (/help lists them)" in err
    assert f"[image {image} goes with the next turn]" in err and "[new conversation]" in err
    stats = [line for line in err if line.startswith("[") and "prompt tokens" in line]
    assert "(0 already in the cache), 0 images encoded" in stats[0]
    assert "1 images encoded" in stats[1] and "(0 already in the cache)" not in stats[1]
    assert "Traceback" not in proc.stderr
