"""The transformers eager reference every parity test compares with: greedy decoding (EOS ignored) with
the logits of every step, and our backend teacher-forced on the reference tokens."""

from __future__ import annotations

import numpy as np
import torch

from smoledge.runtime import ChatRequest, Message, SamplingConfig


def hf_messages(n_images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def hf_reference(model, processor, images, text: str, steps: int):
    """HF eager greedy decoding for ``steps`` steps (EOS ignored): (inputs, tokens, logits of every step)."""
    prompt = processor.apply_chat_template(hf_messages(len(images), text), add_generation_prompt=True)
    inputs = processor(text=prompt, images=[images] if images else None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return inputs, tokens, [logit[0].numpy() for logit in out.logits]


def teacher_forced(pipe, images, text: str, ref_tokens: list[int]):
    """Our logits at every step, fed the reference token each time (one near-tie cannot derail the rest):
    (prepared request, logits per step)."""
    request = ChatRequest((Message.user(text, images),), SamplingConfig(max_new_tokens=len(ref_tokens)))
    prepared = pipe.prepare(request)
    backend = pipe.backend
    cache = backend.new_cache(prepared.input_ids.shape[1] + len(ref_tokens))
    logits = [backend.step(pipe.prompt_embeds(prepared), cache)]
    for token in ref_tokens[:-1]:
        logits.append(backend.step(backend.embed(np.array([[token]])), cache))
    return prepared, logits


def tie_gaps(logits, tokens: list[int]) -> list[float]:
    """Per step: how far ``tokens``' logit is below that step's best (0: the token is the argmax)."""
    return [float(lg.max() - lg[t]) for lg, t in zip(logits, tokens)]


def relative_errors(ours, refs) -> list[float]:
    """Per step: the largest logit difference relative to the reference's largest magnitude."""
    return [float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(ours, refs)]


def expected_stream(ref_tokens: list[int], eos_ids) -> list[int]:
    """The reference tokens up to and including the first stop token (what a stream yields)."""
    out = []
    for token in ref_tokens:
        out.append(token)
        if token in eos_ids:
            break
    return out
