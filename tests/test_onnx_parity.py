"""The exported ONNX graphs one by one against transformers (fp32 bundle of the tiny random model).  The
whole generation against eager (logits within 1e-4 relative at every step, greedy tokens identical for 32
steps, text only and several image sizes) is test_format_parity.py, for every format the registry holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoledge.runtime import load


@pytest.fixture(scope="module")
def fp32_pipe(tiny_fp32_bundle):
    return load(tiny_fp32_bundle)


def test_vision_graph_matches_get_image_features(fp32_pipe, tiny_model_and_processor):
    model, _ = tiny_model_and_processor
    size = model.config.vision_config.image_size
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, size, size)
    mask = torch.ones(3, size, size, dtype=torch.bool)
    with torch.no_grad():
        ref = model.model.get_image_features(pixels[None], mask[None]).pooler_output
    ref = torch.stack(list(ref)).reshape(3, -1, ref[0].shape[-1]).numpy()
    ours = fp32_pipe.backend.encode_images(pixels.numpy(), mask.numpy())
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_decoder_graph_batch_and_padding(tiny_fp32_bundle, tiny_model_and_processor):
    """The decoder takes batch > 1 and padding, like HF with a mask.  GroupQueryAttention's padding is on the
    right (seqlens_k = each row's valid length - 1), so row 1 is right-padded here."""
    import onnxruntime as ort

    model, _ = tiny_model_and_processor
    sess = ort.InferenceSession(str(tiny_fp32_bundle / "onnx" / "decoder_model_merged.onnx"))
    cfg = model.config.text_config
    torch.manual_seed(1)
    ids = torch.randint(10, cfg.vocab_size, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, 4:] = 0  # right padding on row 1
    with torch.no_grad():
        ref = [model(input_ids=ids[:1]).logits.numpy()[0], model(input_ids=ids[1:, :4]).logits.numpy()[0]]
        embeds = model.get_input_embeddings()(ids).numpy()
    heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    feed = {"inputs_embeds": embeds, "attention_mask": mask.numpy(), "logits_to_keep": np.array([6])}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            feed[inp.name] = np.zeros((2, heads, 6, head_dim), np.float32)
    logits = sess.run(["logits"], feed)[0]
    scale = max(np.abs(r).max() for r in ref)
    np.testing.assert_allclose(logits[0], ref[0], atol=1e-4 * scale)
    np.testing.assert_allclose(logits[1, :4], ref[1], atol=1e-4 * scale)
