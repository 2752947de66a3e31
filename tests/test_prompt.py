"""Parity of runtime/prompt.py (+ preprocess) with transformers' Idefics3 / SmolVLM processor.

The reference processor is built offline: a tiny byte-level BPE tokenizer trained with ``tokenizers`` on a
few lines, with SmolVLM's special tokens, wrapped in ``PreTrainedTokenizerFast``; the PIL image processor
(``Idefics3ImageProcessorPil``, see test_preprocess.py for why the PIL one) with the tiny model's config.
Our prompt, tokenized with the ``tokenizers`` library alone (what the runtime has), must give exactly the
processor's ``input_ids``.  SmolVLM2 ships ``SmolVLMProcessor``; its image expansion
(``get_image_prompt_string``) is checked against ours directly, and Idefics3's ``replace_image_token``
builds the same string.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from PIL import Image

from smoledge.errors import ConfigError, InputError
from smoledge.runtime.preprocess import ImageProcessorConfig, preprocess
from smoledge.runtime.prompt import (
    ImageTokens,
    add_special_tokens_for,
    build_prompt,
    expand_image_tokens,
    image_prompt_string,
    messages_to_hf,
    render_chat,
)
from smoledge.runtime.types import ImagePart, Message, TextPart, VideoPart

pytest.importorskip("transformers")
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import Idefics3ImageProcessorPil, Idefics3Processor, PreTrainedTokenizerFast  # noqa: E402
from transformers.models.smolvlm import processing_smolvlm  # noqa: E402

# The SmolVLM / SmolVLM2 hub chat template (chat_template.json of SmolVLM2-256M/500M/2.2B-Instruct).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# transformers' own default for SmolVLM (handles string content and videos too).
SMOLVLM_DEFAULT_TEMPLATE = processing_smolvlm.DEFAULT_CHAT_TEMPLATE
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_IMAGE = ImageProcessorConfig(tile_size=54, longest_edge=216, image_seq_len=4)
SPECIAL_TOKENS = (
    ["<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>",
     "<video>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
)
_CORPUS = [
    "User: What is in this image?\nAssistant: A cat sitting on a red sofa.\n\n",
    "Describe the picture in detail, please. How many people are there?\n\n",
    "system\nYou are a helpful assistant.\nuser\nassistant\n",
]


# --------------------------------------------------------------------------------------------- reference


def build_tiny_tokenizer(vocab_size: int = 400, prepend_bos: str | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer with SmolVLM's special tokens, trained in a few ms (deterministic).

    ``prepend_bos``: a post-processor that prepends this token (SmolVLM's own tokenizer adds none).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(_CORPUS * 8, trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    if prepend_bos:
        bos = (prepend_bos, tok.token_to_id(prepend_bos))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{prepend_bos} $A", pair=f"{prepend_bos} $A $B", special_tokens=[bos]
        )
    return tok


def build_tiny_processor(
    image_cfg: ImageProcessorConfig = TINY_IMAGE, chat_template: str = SMOLVLM_TEMPLATE,
    bos_token: str = "<|im_start|>", prepend_bos: bool = False,
) -> tuple[Idefics3Processor, Tokenizer]:
    """transformers' Idefics3Processor over the tiny tokenizer + PIL image processor, and the raw tokenizer."""
    tok = build_tiny_tokenizer(prepend_bos=bos_token if prepend_bos else None)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.to_str()), bos_token=bos_token,
                                   eos_token="<end_of_utterance>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_cfg.longest_edge}, max_image_size={"longest_edge": image_cfg.tile_size},
        do_image_splitting=image_cfg.do_image_splitting,
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=fast,
                                  image_seq_len=image_cfg.image_seq_len, chat_template=chat_template)
    return processor, tok


@cache
def _reference(split: bool, chat_template: str, bos_token: str = "<|im_start|>",
               prepend_bos: bool = False) -> tuple[Idefics3Processor, Tokenizer]:
    cfg = ImageProcessorConfig.from_dict({**TINY_IMAGE.to_dict(), "do_image_splitting": split})
    return build_tiny_processor(cfg, chat_template, bos_token, prepend_bos)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _hf_conversation(messages: list[Message]) -> list[dict]:
    """The same chat in transformers' form, with the PIL images inline (as apply_chat_template takes them)."""
    out = []
    for m in messages:
        parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image", "image": p.image}
                 for p in m.content]
        out.append({"role": m.role, "content": parts})
    return out


def assert_same_input_ids(messages: list[Message], split: bool = True, chat_template: str = SMOLVLM_TEMPLATE,
                          add_generation_prompt: bool = True, bos_token: str = "<|im_start|>",
                          prepend_bos: bool = False) -> list[int]:
    processor, tok = _reference(split, chat_template, bos_token, prepend_bos)
    cfg = ImageProcessorConfig.from_dict({**TINY_IMAGE.to_dict(), "do_image_splitting": split})
    images = [p.image for m in messages for p in m.content if isinstance(p, ImagePart)]
    grids = list(preprocess(images, cfg).grids) if images else []
    prompt = build_prompt(messages, grids, chat_template, ImageTokens(), cfg.image_seq_len,
                          add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                          eos_token="<end_of_utterance>")
    ours = tok.encode(prompt, add_special_tokens=add_special_tokens_for(prompt, bos_token)).ids

    hf = processor.apply_chat_template(_hf_conversation(messages), add_generation_prompt=add_generation_prompt,
                                       tokenize=True, return_dict=True)
    assert ours == list(hf["input_ids"][0])
    # the rendered text (before expansion) matches too
    hf_text = processor.apply_chat_template(_hf_conversation(messages), add_generation_prompt=add_generation_prompt)
    assert render_chat(messages, chat_template, add_generation_prompt=add_generation_prompt,
                       bos_token=bos_token, eos_token="<end_of_utterance>") == hf_text
    if images:
        ours_pixels = preprocess(images, cfg).pixel_values
        np.testing.assert_array_equal(ours_pixels, hf["pixel_values"][0][: len(ours_pixels)])
    return ours


# --------------------------------------------------------------------------------------------- parity


def test_text_only():
    ids = assert_same_input_ids([Message.user("Describe the picture in detail, please.")])
    assert ids[0] == _reference(True, SMOLVLM_TEMPLATE)[1].token_to_id("<|im_start|>")


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
@pytest.mark.parametrize("size", [(640, 480), (5, 7), (54, 54), (2000, 100), (100, 1500), (300, 300)], ids=str)
def test_one_image(size, split):
    assert_same_input_ids([Message.user("What is in this image?", [_image(*size)])], split=split)


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
def test_two_images_and_multi_turn(split):
    a, b, c = _image(640, 480, 1), _image(60, 400, 2), _image(30, 30, 3)
    messages = [
        Message("system", (TextPart("You are a helpful assistant."),)),
        Message.user("How many people are there?", [a, b]),
        Message("assistant", (TextPart("Two."),)),
        Message("user", (TextPart("And here? "), ImagePart(c), TextPart(" Describe it."))),
    ]
    assert_same_input_ids(messages, split=split)
    assert_same_input_ids(messages, split=split, add_generation_prompt=False)


def test_transformers_default_smolvlm_template():
    assert_same_input_ids([Message.user("What is in this image?", [_image(200, 120)])],
                          chat_template=SMOLVLM_DEFAULT_TEMPLATE)


@pytest.mark.parametrize("split", [True, False], ids=["split", "nosplit"])
def test_chatml_template_with_images_in_user_turn(split):
    messages = [
        Message("system", (TextPart("You are a helpful assistant."),)),
        Message.user("What is in this image?", [_image(640, 480), _image(20, 90, 5)]),
    ]
    assert_same_input_ids(messages, split=split, chat_template=CHATML_TEMPLATE)


@pytest.mark.parametrize("template", [SMOLVLM_TEMPLATE, CHATML_TEMPLATE], ids=["smolvlm", "chatml-with-bos"])
def test_tokenizer_that_prepends_bos(template):
    """With a BOS-adding post-processor, HF adds it unless the rendered prompt already starts with bos_token."""
    messages = [Message.user("What is in this image?", [_image(90, 60)])]
    ids = assert_same_input_ids(messages, chat_template=template, bos_token="<|endoftext|>", prepend_bos=True)
    tok = _reference(True, template, "<|endoftext|>", True)[1]
    assert ids.count(tok.token_to_id("<|endoftext|>")) == 1


# --------------------------------------------------------------------------------------------- expansion


@pytest.mark.parametrize("grid", [(0, 0), (1, 1), (1, 4), (4, 1), (3, 4), (6, 6)], ids=str)
@pytest.mark.parametrize("seq_len", [1, 64, 81])
def test_expansion_matches_smolvlm_and_idefics3(grid, seq_len):
    tokens = ImageTokens()
    smolvlm = processing_smolvlm.get_image_prompt_string(*grid, seq_len, fake_token_around_image=tokens.fake_image,
                                                         image_token=tokens.image,
                                                         global_image_token=tokens.global_image)
    assert image_prompt_string(*grid, tokens, seq_len) == smolvlm
    processor, _ = _reference(True, SMOLVLM_TEMPLATE)
    processor.image_seq_len = seq_len  # Idefics3's replace_image_token reads the attribute
    idefics3 = processor.replace_image_token({"rows": [[grid[0]]], "cols": [[grid[1]]]}, image_idx=0)
    processor.image_seq_len = TINY_IMAGE.image_seq_len
    assert smolvlm == idefics3


def test_expansion_with_custom_tokens():
    tokens = ImageTokens(image="<im>", fake_image="<f>", global_image="<g>")
    assert expand_image_tokens("a<im>b<im>", [(0, 0), (1, 2)], tokens, 2) == (
        "a<f><g><im><im><f>b<f><row_1_col_1><im><im><f><row_1_col_2><im><im>\n\n<f><g><im><im><f>"
    )
    assert ImageTokens.from_dict(tokens.to_dict()) == tokens
    # the manifest's "tokens" section holds ids and bos/eos beside the image strings
    assert ImageTokens.from_dict({**tokens.to_dict(), "image_token_id": 7, "bos_token": "<s>"}) == tokens
    assert ImageTokens.from_dict({}) == ImageTokens()
    with pytest.raises(ConfigError):
        ImageTokens.from_dict({"image": ""})


def test_placeholder_count_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="2 <image> placeholders but 1 images"):
        expand_image_tokens("<image><image>", [(0, 0)], ImageTokens(), 4)
    with pytest.raises(InputError, match="0 <image> placeholders"):
        expand_image_tokens("no image here", [(1, 1)], ImageTokens(), 4)
    with pytest.raises(InputError, match="2 images but 1 tile grids"):
        build_prompt([Message.user("x", [_image(5, 5), _image(5, 5)])], [(0, 0)], SMOLVLM_TEMPLATE, ImageTokens(), 4)
    # a template that drops the image parts: placeholders and images disagree
    with pytest.raises(InputError, match="0 <image> placeholders but 1 images"):
        build_prompt([Message.user("x", [_image(5, 5)])], [(0, 0)], "{{ messages[0]['content'][1]['text'] }}",
                     ImageTokens(), 4)
    with pytest.raises(ConfigError):
        expand_image_tokens("<image>", [(0, 0)], ImageTokens(), 0)


def test_literal_placeholder_in_user_text_counts_like_transformers():
    # transformers counts every "<image>" in the text, including one typed by the user
    messages = [Message.user("what is <image>?", [_image(5, 5)])]
    with pytest.raises(InputError, match="2 <image> placeholders but 1 images"):
        build_prompt(messages, [(0, 0)], SMOLVLM_TEMPLATE, ImageTokens(), 4)


# --------------------------------------------------------------------------------------------- rendering


def test_messages_to_hf_form():
    m = Message("user", (ImagePart(b"x"), TextPart("hi")))
    assert messages_to_hf([m]) == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]


def test_video_parts_render_as_video_placeholders():  # expanded by runtime/video.py (tests/test_video*.py)
    message = Message("user", (VideoPart("clip.mp4"), TextPart("?")))
    assert messages_to_hf([message])[0]["content"][0] == {"type": "video"}
    expected = "<|im_start|>User: <video>?<end_of_utterance>\nAssistant:"
    assert render_chat([message], SMOLVLM_DEFAULT_TEMPLATE) == expected


def test_template_environment_like_transformers():
    messages = [Message.user("héllo <b>")]
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                "{{ ns.n }} {{ messages[0]['content'][0]['text'] | tojson }} {{ dict(a=1) | tojson }}"
                "{% generation %} gen{% endgeneration %}{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}"
                "{{ i }}{% endfor %}[{{ bos_token }}]")
    assert render_chat(messages, template) == '1 "héllo <b>" {"a": 1} gen1[]'
    assert render_chat(messages, "{{ bos_token }}{{ eos_token }}", bos_token="<s>", eos_token="</s>") == "<s></s>"
    assert render_chat(messages, "{{ custom }}", extra_vars={"custom": "x"}) == "x"


def test_template_errors():
    with pytest.raises(InputError, match="roles must alternate"):
        render_chat([Message.user("a")], "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ConfigError, match="not valid Jinja"):
        render_chat([Message.user("a")], "{% for %}")
    with pytest.raises(InputError):  # the sandbox refuses attribute escapes
        render_chat([Message.user("a")], "{{ messages.__class__.__mro__ }}{% set ns = namespace(_x=1) %}")
