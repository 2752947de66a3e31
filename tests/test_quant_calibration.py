"""The calibration text ships with the package and never overlaps a text the fidelity report scores."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smoledge.quantize.calibration import BUILTIN_TEXT, CalibrationSpec, token_ids
from smoledge.fidelity import TEXT_FILE

REPO = Path(__file__).resolve().parents[1]
# Every text anything scores: the shipped fidelity text and the sweep's held-out text.
SCORED = (TEXT_FILE, REPO / "docs" / "quant-heldout-text.txt")
N = 8


def _ngrams(tokens: list, n: int = N) -> set[tuple]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _every_token(model_dir: Path) -> list[int]:
    """The whole shipped calibration text's token ids, in order."""
    return [t for seq in token_ids(CalibrationSpec(tokens=10**6), model_dir / "tokenizer.json") for t in seq]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


@pytest.mark.parametrize("scored", SCORED, ids=lambda p: p.name)
def test_no_8_word_ngram_of_a_scored_text_is_in_the_calibration_text(scored):
    shared = _ngrams(_words(BUILTIN_TEXT.read_text())) & _ngrams(_words(scored.read_text()))
    assert not shared, sorted(shared)[:5]


@pytest.mark.parametrize("scored", SCORED, ids=lambda p: p.name)
def test_no_8_token_ngram_of_a_scored_text_is_in_the_calibration_tokens(scored, realtext_model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(realtext_model_dir / "tokenizer.json"))
    shared = _ngrams(_every_token(realtext_model_dir)) & _ngrams(tok.encode(scored.read_text()).ids)
    assert not shared, [tok.decode(list(g)) for g in sorted(shared)[:5]]


def test_calibration_text_is_prose_and_chat_turns_of_useful_size(realtext_model_dir):
    text = BUILTIN_TEXT.read_text()
    assert text.count("<|im_start|>user") >= 5 and text.count("<|im_start|>assistant") >= 5
    tokens = len(_every_token(realtext_model_dir))
    assert 6000 <= tokens <= 12000  # int4-mixed calibrates on all of it (8,192 tokens at most)


def test_the_default_recipe_calibrates_on_the_whole_shipped_text(realtext_model_dir):
    from smoledge.quantize.recipe import DEFAULT_RECIPE, load_recipe

    spec = load_recipe(DEFAULT_RECIPE).calibration
    assert spec.text == "builtin"
    used = [t for seq in token_ids(spec, realtext_model_dir / "tokenizer.json") for t in seq]
    assert used == _every_token(realtext_model_dir)
