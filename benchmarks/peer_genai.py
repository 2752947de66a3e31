"""onnxruntime-genai: its model builder's INT4 export of the same text decoder, run by its own runtime.

The builder takes a causal LM, so ``prepare`` writes the SmolVLM text decoder out as a
``LlamaForCausalLM`` folder (same tensors, renamed; tokenizer copied) and runs
``python -m onnxruntime_genai.models.builder -p int4 -e cpu`` on it with ``block_size=32
accuracy_level=4`` (MatMulNBits, int8 activations) and the builder's defaults otherwise
(GroupQueryAttention on CPU, symmetric RTN).  Text only: the builder has no SmolVLM vision path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from smoledge.benchmarks.peers import Case, Engine, FirstToken, PrepareContext, PeerSkipped, Subject, folder_bytes
from smoledge.benchmarks.peers import missing_packages

NAME = "genai"
BUILDER_OPTIONS = ("block_size=32", "accuracy_level=4")
SHARD_BYTES = 2 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def missing() -> str | None:
    return missing_packages("onnxruntime_genai", "torch", "transformers")


def write_text_checkpoint(model_dir: Path, out: Path) -> Path:
    """The SmolVLM text decoder as a LlamaForCausalLM folder (sharded safetensors, tokenizer copied)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    text = {k: v for k, v in config["text_config"].items() if k not in ("architectures", "dtype")}
    text.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float32",
                tie_word_embeddings=config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    index, shard, shard_bytes = {}, {}, 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.startswith("model.text_model.") or name == "lm_head.weight":
                    tensor = f.get_tensor(name)
                    shard[name.replace("model.text_model.", "model.")] = tensor
                    shard_bytes += tensor.numel() * tensor.element_size()
                if shard_bytes >= SHARD_BYTES:
                    _save_shard(partial, shard, index, save_file)
                    shard, shard_bytes = {}, 0
    _save_shard(partial, shard, index, save_file)
    (partial / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (partial / "config.json").write_text(json.dumps(text, indent=1))
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, partial / name)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def _save_shard(folder: Path, shard: dict, index: dict, save_file) -> None:
    if not shard:
        return
    name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    index.update({key: name for key in shard})


def build(model_dir: Path, out: Path, work: Path) -> Path:
    """Run the genai model builder (in its own process: it loads the whole float model)."""
    hf = work / "hf-text"
    if not (hf / "config.json").is_file():
        write_text_checkpoint(model_dir, hf)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf), "-o", str(partial),
           "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache"), "--extra_options", *BUILDER_OPTIONS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not (partial / "genai_config.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise PeerSkipped(f"the onnxruntime-genai builder failed: {' | '.join(tail)[:400]}")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    for scratch in (work / "builder-cache", hf):  # the float copy is as big as the text model
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def prepare(ctx: PrepareContext) -> list[Subject]:
    out = ctx.work_dir / "genai" / "int4"
    if not (out / "genai_config.json").is_file():
        build(ctx.model_dir, out, ctx.work_dir / "genai")
    model_bytes = sum(p.stat().st_size for p in out.glob("*.onnx*"))
    params = _text_parameters(ctx.model_dir)
    return [Subject(name="onnxruntime-genai int4", peer=NAME, artifact=str(out), size_bytes=folder_bytes(out),
                    bits_per_weight=round(8 * model_bytes / params, 3) if params else None,
                    notes=("model builder -p int4 -e cpu " + " ".join(BUILDER_OPTIONS) + "; text decoder only",))]


def _text_parameters(model_dir: Path) -> int:
    """Weights of the text decoder (embedding and lm_head included) in the SmolVLM checkpoint."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            total += sum(int(np.prod(f.get_slice(n).get_shape())) for n in f.keys()
                         if n.startswith("model.text_model.") or n == "lm_head.weight")
    return total


class GenaiEngine(Engine):
    def __init__(self, subject: Subject, threads: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(subject.artifact)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def _generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        # min_length keeps EOS from ending a timed run early (greedy otherwise)
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        return self.og.Generator(self.model, params)

    def first_token(self, case: Case) -> FirstToken | None:
        if case.image:
            return None
        start = time.perf_counter()
        gen = self._generator(len(case.prompt_ids) + 2)
        gen.append_tokens(np.asarray([case.prompt_ids], dtype=np.int32))
        gen.generate_next_token()
        int(gen.get_next_tokens()[0])
        return FirstToken(time.perf_counter() - start, prompt_tokens=len(case.prompt_ids))

    def generate(self, ids: list[int], new_tokens: int) -> Iterator[int]:
        gen = self._generator(len(ids) + new_tokens)
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        for _ in range(new_tokens):
            gen.generate_next_token()
            yield int(gen.get_next_tokens()[0])

    def logits(self, ids: list[int]) -> np.ndarray:
        gen = self._generator(len(ids) + 1)
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        logits = np.asarray(gen.get_output("logits"), dtype=np.float32)
        if logits.ndim == 3 and logits.shape[1] == len(ids):
            return logits[0]
        raise RuntimeError(f"genai returned logits of shape {logits.shape} for {len(ids)} tokens")


def open_engine(subject: Subject, threads: int, fidelity: bool = False) -> GenaiEngine:
    return GenaiEngine(subject, threads)
