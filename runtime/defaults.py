"""Sampling defaults for the command line and the server (the library's ``SamplingConfig()`` stays greedy).

Greedy decoding with no repetition penalty loops on small models ("hi" gave 256 tokens of one repeated
sentence), so ``smoledge run`` / ``chat`` sample by default, as ``ollama run`` and ``llama-cli`` do:
:data:`CLI` is llama.cpp's temperature 0.8, top-k 40 and top-p 0.95 with Ollama's repetition penalty 1.1
(llama.cpp's own is 1.0, off).  The server follows each request's parameters and, where a request is silent,
OpenAI's defaults (:data:`SERVER`: temperature 1, top-p 1).  Either way the checkpoint's
``generation_config.json`` comes first where it sets a value (the manifest's ``generation.checkpoint``), as
vLLM does.  ``temperature 0`` is greedy everywhere, and on the command line it is the library's greedy exactly:
without a ``--repetition-penalty`` (or one the checkpoint sets) it turns the default penalty off too.
"""

from __future__ import annotations

import dataclasses

from smoledge.runtime.manifest import Generation
from smoledge.runtime.types import SamplingConfig

CLI = SamplingConfig(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1)
SERVER = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
GREEDY = SamplingConfig()


def sampling_defaults(generation: Generation, fallback: SamplingConfig = CLI) -> SamplingConfig:
    """``fallback`` with what the checkpoint's generation_config sets, and the bundle's answer length."""
    values = {"max_new_tokens": generation.max_new_tokens}
    if generation.checkpoint is not None:
        values.update({k: v for k, v in dataclasses.asdict(generation.checkpoint).items() if v is not None})
    return dataclasses.replace(fallback, **values)


def with_flags(generation: Generation, fallback: SamplingConfig, given: dict) -> SamplingConfig:
    """:func:`sampling_defaults` with the values a user gave (``given``: field -> value, None = not given)."""
    config = dataclasses.replace(sampling_defaults(generation, fallback),
                                 **{k: v for k, v in given.items() if v is not None})
    own = generation.checkpoint.repetition_penalty if generation.checkpoint is not None else None
    if config.temperature <= 0 and given.get("repetition_penalty") is None and own is None:
        config = dataclasses.replace(config, repetition_penalty=1.0)
    return config
