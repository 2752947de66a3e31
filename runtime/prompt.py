"""Chat prompt rendering and SmolVLM image-token expansion, identical to the transformers processor.

Two steps, as in transformers:

1. :func:`render_chat` renders the chat template (Jinja, sandboxed, with the same environment as
   transformers' ``apply_chat_template``) over the messages; each image becomes one ``<image>`` placeholder.
2. :func:`expand_image_tokens` replaces the i-th ``<image>`` placeholder with image i's token layout
   (``get_image_prompt_string`` in transformers' ``processing_smolvlm.py``; Idefics3's
   ``replace_image_token`` is the same string)::

       split (rows x cols):  <fake_token_around_image><row_1_col_1><image>*N<fake_token_around_image><row_1_col_2>...\\n
                             ... one line per row ...\\n
                             \\n<fake_token_around_image><global-img><image>*N<fake_token_around_image>
       not split (0 x 0):    <fake_token_around_image><global-img><image>*N<fake_token_around_image>

:func:`build_prompt` does both, and for a video request (SmolVLM2) also replaces the i-th ``<video>`` placeholder
with video i's frames (:func:`expand_video_tokens`; the text itself comes from :mod:`smoledge.runtime.video`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from smoledge.errors import ConfigError, InputError

from smoledge.runtime.types import ImagePart, Message, TextPart, VideoPart


@dataclass(frozen=True)
class ImageTokens:
    """The image token strings of the tokenizer (SmolVLM defaults); ``<row_R_col_C>`` is fixed by transformers."""

    image: str = "<image>"
    fake_image: str = "<fake_token_around_image>"
    global_image: str = "<global-img>"

    @staticmethod
    def row_col(row: int, col: int) -> str:
        """The tag before tile (row, col), 1-based."""
        return f"<row_{row}_col_{col}>"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageTokens:
        """Read the image-token keys of ``d`` (other keys are ignored: the manifest's "tokens" section
        holds ids and bos/eos too); a missing key keeps the SmolVLM default."""
        mine = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        bad = {k: v for k, v in mine.items() if not isinstance(v, str) or not v}
        if bad:
            raise ConfigError(f"image tokens must be non-empty strings, got {bad}", hint="fix the bundle manifest")
        return cls(**mine)


# --------------------------------------------------------------------------------------------- expansion


def image_prompt_string(rows: int, cols: int, tokens: ImageTokens, image_seq_len: int) -> str:
    """The token string for one image (transformers ``get_image_prompt_string``)."""
    tile = tokens.image * image_seq_len
    global_part = f"{tokens.fake_image}{tokens.global_image}{tile}{tokens.fake_image}"
    if rows == 0 and cols == 0:
        return global_part
    lines = "".join(
        "".join(f"{tokens.fake_image}{tokens.row_col(r + 1, c + 1)}{tile}" for c in range(cols)) + "\n"
        for r in range(rows)
    )
    return f"{lines}\n{global_part}"


def expand_image_tokens(text: str, grids: Sequence[tuple[int, int]], tokens: ImageTokens, image_seq_len: int) -> str:
    """Replace the i-th image placeholder in ``text`` with image i's expansion (``grids[i]`` = (rows, cols))."""
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len <= 0:
        raise ConfigError(f"image_seq_len must be a positive integer, got {image_seq_len!r}",
                          hint="fix the bundle manifest's image section")
    pieces = text.split(tokens.image)
    if len(pieces) - 1 != len(grids):
        raise InputError(
            f"the prompt has {len(pieces) - 1} {tokens.image} placeholders but {len(grids)} images were given",
            hint=f"give one image per {tokens.image} placeholder (the chat template writes one per image part; "
            f"literal {tokens.image} in message text counts too)",
        )
    out = [pieces[0]]
    for (rows, cols), piece in zip(grids, pieces[1:]):
        out.append(image_prompt_string(int(rows), int(cols), tokens, image_seq_len))
        out.append(piece)
    return "".join(out)


def expand_video_tokens(text: str, video_prompts: Sequence[str], video_token: str = "<video>") -> str:
    """Replace the i-th ``video_token`` in ``text`` with ``video_prompts[i]`` (video i's frames and timestamps,
    from :func:`smoledge.runtime.video.video_prompt_string`).  Run it after :func:`expand_image_tokens`."""
    pieces = text.split(video_token)
    if len(pieces) - 1 != len(video_prompts):
        raise InputError(
            f"the prompt has {len(pieces) - 1} {video_token} placeholders but {len(video_prompts)} videos were given",
            hint=f"give one video per {video_token} placeholder (literal {video_token} in message text counts too; "
            "the chat template must write one per video part)",
        )
    out = [pieces[0]]
    for prompt, piece in zip(video_prompts, pieces[1:]):
        out.extend((prompt, piece))
    return "".join(out)


# --------------------------------------------------------------------------------------------- chat template


def messages_to_hf(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """:class:`Message` objects -> transformers' chat form ``{"role", "content": [{"type": ...}, ...]}``."""
    out = []
    for message in messages:
        content = []
        for part in message.content:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                content.append({"type": "image"})
            elif isinstance(part, VideoPart):
                content.append({"type": "video"})
            else:
                raise InputError(f"unsupported message part {type(part).__name__}",
                                 hint="use TextPart, ImagePart or VideoPart")
        out.append({"role": message.role, "content": content})
    return out


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag); render the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """``dict`` for templates, without attribute access to the type (as in transformers)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attributes (as in transformers)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    # like transformers: no HTML escaping, and the json.dumps options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_chat_template(chat_template: str) -> jinja2.Template:
    """Compile with transformers' environment (sandboxed, trim_blocks, lstrip_blocks, loopcontrols)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ConfigError(f"the chat template is not valid Jinja (line {err.lineno}: {err.message})",
                          hint="fix chat_template in the bundle manifest") from err


def render_chat(
    messages: Sequence[Message],
    chat_template: str,
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    extra_vars: Mapping[str, Any] | None = None,
) -> str:
    """Render ``messages`` with ``chat_template`` exactly as ``processor.apply_chat_template(tokenize=False)``.

    Special tokens that are None are left undefined (so ``{{ bos_token }}`` renders empty, as in transformers,
    where a missing token is absent from ``special_tokens_map``).  ``extra_vars`` override them.
    """
    template = compile_chat_template(chat_template)
    variables: dict[str, Any] = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    variables.update(extra_vars or {})
    try:
        return template.render(
            messages=messages_to_hf(messages), tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **variables,
        )
    except jinja2.exceptions.TemplateError as err:
        raise InputError(f"the chat template rejected the conversation: {err}",
                         hint="check the message roles and order the model expects") from err
    except (TypeError, ValueError, KeyError, IndexError) as err:
        raise ConfigError(f"the chat template failed on these messages ({type(err).__name__}: {err})",
                          hint="the template must read list content parts of type 'text' / 'image'") from err


def add_special_tokens_for(prompt: str, bos_token: str | None) -> bool:
    """Whether to tokenize ``prompt`` with the tokenizer's special tokens (its post-processor, e.g. a BOS).

    transformers' ``processor.apply_chat_template(tokenize=True)`` turns them off when the rendered prompt
    already starts with ``bos_token``, so the BOS is not doubled; otherwise they are on.
    """
    return not (bos_token and prompt.startswith(bos_token))


def build_prompt(
    messages: Sequence[Message],
    image_grids: Sequence[tuple[int, int]],
    chat_template: str,
    tokens: ImageTokens,
    image_seq_len: int,
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    extra_vars: Mapping[str, Any] | None = None,
    video_prompts: Sequence[str] = (),
    video_token: str = "<video>",
) -> str:
    """Rendered chat with every image and video placeholder expanded; ``image_grids`` in the messages' image
    order, ``video_prompts`` (each video's expansion) in their video order."""
    n_images = sum(isinstance(p, ImagePart) for m in messages for p in m.content)
    if n_images != len(image_grids):
        raise InputError(f"the messages hold {n_images} images but {len(image_grids)} tile grids were given",
                         hint="preprocess every image of the request, in order")
    n_videos = sum(isinstance(p, VideoPart) for m in messages for p in m.content)
    if n_videos != len(video_prompts):
        raise InputError(f"the messages hold {n_videos} videos but {len(video_prompts)} video prompts were given",
                         hint="sample every video of the request, in order")
    text = render_chat(messages, chat_template, add_generation_prompt=add_generation_prompt,
                       bos_token=bos_token, eos_token=eos_token, extra_vars=extra_vars)
    text = expand_image_tokens(text, image_grids, tokens, image_seq_len)
    return expand_video_tokens(text, video_prompts, video_token) if n_videos else text
