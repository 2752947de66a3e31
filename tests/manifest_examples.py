"""A complete, valid typed manifest for tests that need one without exporting a bundle (the router, the
cloud client); every figure a test relies on is passed in."""

from __future__ import annotations

from smoledge.runtime.manifest import (SCHEMA_VERSION, Cloud, FileEntry, Generation, Graph, Manifest, Memory, Model,
                                       OnnxArtifact, Source, Tensor, TextModel, TokenizerFile, Tokens, VisionModel)
from smoledge.runtime.preprocess import ImageProcessorConfig


def _graph(name: str) -> Graph:
    return Graph(file=f"onnx/{name}.onnx", method=None, files=(f"onnx/{name}.onnx",),
                 inputs={"x": Tensor(("batch_size", 8), None)}, outputs={"y": Tensor(("batch_size", 8), None)},
                 states={}, dims={}, precision="fp32", bytes=1, quantization=None)


def example_manifest(*, context_length: int = 4096, memory: Memory | None = None, image: ImageProcessorConfig | None = None,
                     cloud: Cloud = Cloud(None, ()), model_id: str = "acme/tiny-vlm") -> Manifest:
    graphs = {name: _graph(name) for name in ("vision_encoder", "embed_tokens", "decoder")}
    return Manifest(
        schema_version=SCHEMA_VERSION, smoledge_version="0.0.0", created="2026-01-01T00:00:00+00:00",
        source=Source(model_id, None, {}, None),
        model=Model("smolvlm", "SmolVLMForConditionalGeneration", 4, 64,
                    TextModel("llama", 64, 2, 4, 2, 16, 128, 256), VisionModel(32, 2, 4, 64, 512, 16)),
        context_length=context_length,
        image=image or ImageProcessorConfig(tile_size=512, longest_edge=2048, image_seq_len=64),
        video=None,
        tokens=Tokens("<image>", "<fake_token_around_image>", "<global-img>", 3, None, None, None, None, None),
        chat_template="{{ messages }}",
        generation=Generation(64, (2,), 0.0, 0, 1.0, 1.0),
        memory=memory or Memory(1000, 10, 100, 0, ""),
        cloud=cloud,
        tokenizer=TokenizerFile("tokenizer.json"),
        artifacts={"onnx": OnnxArtifact(format="onnx", graphs=graphs, context_capacity=None, recipe={"name": "fp32"},
                                        weight_bytes=3, runtime={}, ort_fusions=None)},
        files={f"onnx/{name}.onnx": FileEntry("0" * 64, 1) for name in graphs},
    )
