"""Level 1 of the Core ML proof: the torch modules that are converted match transformers eager.

The decoder wrapper owns its KV cache, reads RoPE from precomputed tables and takes an additive mask,
so it is compared with HF's own generation: greedy tokens identical (free-running, 24 steps) and,
teacher-forced, logits within 1e-4 of eager relative to their scale with a float32 cache.  With the fp16
cache Core ML needs (the module exactly as converted), greedy tokens stay identical and logits stay
within 1e-2.  The vision wrapper matches ``get_image_features`` within 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil_eval import single_threaded
from smoledge.export.coreml_graphs import (CoreMLEmbedTokens, CoreMLVisionEncoder, StatefulDecoder,
                                           additive_causal_mask)

STEPS = 24
CAPACITY = 96
FP32_TOL, FP16_CACHE_TOL = 1e-4, 1e-2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_threaded():
        yield


def _load(model_dir):
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return _load(tiny_model_dir)


@pytest.fixture(scope="module")
def realtext_model(realtext_model_dir):
    return _load(realtext_model_dir)


def _prompt(model, n: int = 11) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(10, min(model.config.text_config.vocab_size, 2000), (1, n), generator=generator)


def _eager(model, ids):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS,
                             min_new_tokens=STEPS, do_sample=False, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [logits[0].numpy() for logits in out.logits]


def run_wrapper(decoder, embed, ids, steps: int, forced: list[int] | None = None):
    """Prefill then one token per step, through the wrapper's own cache; yields last-position logits."""
    past, x = 0, embed(ids)
    with torch.no_grad():
        for step in range(steps):
            query = x.shape[1]
            positions = torch.arange(past, past + query, dtype=torch.int32)[None]
            logits = decoder(x, positions, additive_causal_mask(past, query))[0, -1].numpy()
            yield logits
            past += query
            token = forced[step] if forced else int(np.argmax(logits))
            x = embed(torch.tensor([[token]]))


def _check_decoder(model):
    ids = _prompt(model)
    ref_tokens, ref_logits = _eager(model, ids)
    embed = CoreMLEmbedTokens(model).eval()
    for cache_dtype, tol in ((torch.float32, FP32_TOL), (torch.float16, FP16_CACHE_TOL)):
        decoder = StatefulDecoder(model, CAPACITY, cache_dtype).eval()
        forced = list(run_wrapper(decoder, embed, ids, STEPS, ref_tokens))
        for step, (ours, ref) in enumerate(zip(forced, ref_logits)):
            err = np.abs(ours - ref).max() / np.abs(ref).max()
            assert err < tol, f"{cache_dtype} cache: step {step} logits differ by {err:.2e} (relative)"
        decoder.reset()
        free = [int(np.argmax(logits)) for logits in run_wrapper(decoder, embed, ids, STEPS)]
        assert free == ref_tokens, f"{cache_dtype} cache: greedy tokens differ from eager"
    assert len(set(ref_tokens)) > 3, "the model collapsed onto a few tokens; the test would prove little"


def test_tiny_decoder_wrapper_matches_eager(tiny_model):
    _check_decoder(tiny_model)


@pytest.mark.slow
def test_realtext_decoder_wrapper_matches_eager(realtext_model):
    _check_decoder(realtext_model)


def test_chunked_prefill_fills_the_same_cache(tiny_model):
    """Prefill in two calls (S=7 then S=4) leaves the cache and the next logits of one S=11 call."""
    ids = _prompt(tiny_model)
    embed = CoreMLEmbedTokens(tiny_model).eval()
    whole, chunked = (StatefulDecoder(tiny_model, CAPACITY, torch.float32).eval() for _ in range(2))
    x = embed(ids)
    with torch.no_grad():
        ref = whole(x, torch.arange(11, dtype=torch.int32)[None], additive_causal_mask(0, 11))[0, -1]
        chunked(x[:, :7], torch.arange(7, dtype=torch.int32)[None], additive_causal_mask(0, 7))
        ours = chunked(x[:, 7:], torch.arange(7, 11, dtype=torch.int32)[None], additive_causal_mask(7, 4))[0, -1]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(chunked.key_cache, whole.key_cache, rtol=0, atol=1e-5 * whole.key_cache.abs().max().item())
    assert whole.key_cache[:, :, 11:].abs().max() == 0, "the cache was written past the sequence"


def _check_vision(model, tiles: int = 2):
    side = model.config.vision_config.image_size
    pixels = torch.randn(tiles, 3, side, side, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(tiles, side, side, dtype=torch.bool)
    with torch.no_grad():
        ref = model.model.get_image_features(pixels[None], mask[None]).pooler_output
        ref = torch.stack(list(ref)).reshape(tiles, -1, ref[0].shape[-1])
        ours = torch.cat([CoreMLVisionEncoder(model).eval()(tile[None]) for tile in pixels])
    torch.testing.assert_close(ours, ref, rtol=0, atol=FP32_TOL * ref.abs().max().item())


def test_tiny_vision_wrapper_matches_get_image_features(tiny_model):
    _check_vision(tiny_model)


@pytest.mark.slow
def test_realtext_vision_wrapper_matches_get_image_features(realtext_model):
    _check_vision(realtext_model, tiles=1)


def test_rms_norm_is_hf_norm_and_finite_in_fp16(tiny_model):
    """The fp16-safe RMSNorm equals HF's in float32, and stays finite in fp16 on SmolLM2-sized activations
    (25,000), where HF's formula computed in fp16 (as Core ML's fp16 compute runs it) overflows."""
    import copy

    from smoledge.export.coreml_graphs import rms_norm

    norm = tiny_model.model.text_model.norm
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 3
    torch.testing.assert_close(rms_norm(norm, x), norm(x), rtol=1e-5, atol=1e-6)
    big = x.clone()
    big[:, 5] = 25000.0
    assert torch.isinf(big.half().pow(2).mean(-1)).all(), "the fp16 overflow this norm avoids is gone"
    out = rms_norm(copy.deepcopy(norm).half(), big.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), norm(big), rtol=2e-3, atol=2e-3)
