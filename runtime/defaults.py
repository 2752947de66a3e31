"""Sampling defaults for the command line and the server (the library's ``SamplingConfig()`` stays greedy).

Greedy decoding with no repetition penalty loops on small models ("hi" gave 256 tokens of one repeated
sentence), so ``smoledge run`` / ``chat`` sample by default, as ``ollama run`` and ``llama-cli`` do:
:data:`CLI` is llama.cpp's temperature 0.8, top-k 40 and top-p 0.95 with Ollama's repetition penalty 1.1
(llama.cpp's own is 1.0, off).  The server follows each request's parameters and, where a request is silent,
OpenAI's defaults (:data:`SERVER`: temperature 1, top-p 1).  Either way the checkpoint's
``generation_config.json`` comes first where it sets a value (the manifest's ``generation.checkpoint``), as
vLLM does.  ``temperature 0`` is greedy everywhere.
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


def describe(config: SamplingConfig) -> str:
    """One line for ``--stats`` and the docs: what the sampler does."""
    if config.temperature <= 0:
        extra = f", repetition penalty {config.repetition_penalty:g}" if config.repetition_penalty != 1 else ""
        return f"greedy{extra}"
    return (f"temperature {config.temperature:g}, top-k {config.top_k or 'off'}, top-p {config.top_p:g}, "
            f"repetition penalty {config.repetition_penalty:g}, seed {config.seed if config.seed is not None else 'random'}")
