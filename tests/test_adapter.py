"""Fine-tuned checkpoints: ``smoledge export MODEL --adapter DIR`` merges a PEFT LoRA adapter before export.

The adapter is built offline on the tiny model: LoRA (r=4, alpha=8: scale 2) on every linear layer of the
text decoder, the vision encoder and the connector, with A and B drawn at random (std 0.1), so it moves the
outputs well past the parity tolerance.  The reference is transformers eager with the adapter applied by
peft *unmerged* (``PeftModel.from_pretrained``: LoRA as extra branches), which shares no code with the
merge the export does.  Tolerance: logits of the fp32 ONNX bundle within 1e-4 of that reference (relative to
their scale) at the prompt and at every teacher-forced step; the same logits differ from the base model's
by more than 100x that.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import synthetic_image
from smoledge import cli
from smoledge.errors import ConfigError, ExportError, ModelLoadError
from smoledge.runtime import load

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from eager_reference import hf_reference, teacher_forced  # noqa: E402

from smoledge.export.adapter import merge_adapter, resolve_adapter  # noqa: E402
from smoledge.export.loader import sha256_file  # noqa: E402

STEPS = 6
REL_TOL = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # text decoder
           "out_proj", "fc1", "fc2",  # vision encoder (with its q/k/v_proj)
           "proj"]  # connector: model.connector.modality_projection.proj


def _base_model(model_dir):
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()


def build_lora(model_dir, out, *, targets=TARGETS, seed: int = 7):
    model = peft.get_peft_model(_base_model(model_dir), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    return build_lora(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "lora")


@pytest.fixture(scope="module")
def adapter_bundle(tiny_model_dir, adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny-lora-fp32"
    rc = cli.main(["export", str(tiny_model_dir), "--adapter", str(adapter_dir), "--quant", "fp32",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def _first_logits_and_steps(pipe, model, processor, image, text):
    """Bundle and eager logits at the prompt and STEPS teacher-forced steps (eager greedy tokens)."""
    inputs, ref_tokens, ref_logits = hf_reference(model, processor, [image], text, STEPS)
    prepared, ours = teacher_forced(pipe, [image], text, ref_tokens)
    np.testing.assert_array_equal(prepared.input_ids, inputs["input_ids"].numpy())
    return ours, ref_logits


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_lora_bundle_matches_eager_with_the_adapter(adapter_bundle, adapter_dir, tiny_model_dir,
                                                    tiny_model_and_processor):
    base, processor = tiny_model_and_processor
    with_lora = peft.PeftModel.from_pretrained(_base_model(tiny_model_dir), str(adapter_dir)).eval()
    pipe = load(adapter_bundle)
    image = synthetic_image(100, 70, seed=4)
    ours, ref = _first_logits_and_steps(pipe, with_lora, processor, image, "What is in this image?")
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert _rel(a, b) < REL_TOL, f"step {step}: {_rel(a, b):.2e} from eager with the adapter"
    with torch.no_grad():  # and the adapter matters: the base model's prompt logits are far away
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}],
            add_generation_prompt=True)
        base_logits = base(**processor(text=prompt, images=[[image]], return_tensors="pt")).logits[0, -1].numpy()
    assert _rel(ours[0], base_logits) > 100 * REL_TOL


def test_manifest_records_the_adapter(adapter_bundle, adapter_dir):
    source = json.loads((adapter_bundle / "manifest.json").read_text())["source"]
    entry = source["adapter"]
    files = {name: sha256_file(adapter_dir / name) for name in ("adapter_config.json", "adapter_model.safetensors")}
    assert entry["id"] == str(adapter_dir.resolve()) and entry["revision"] is None
    assert entry["files"] == files and entry["sha256"] == resolve_adapter(str(adapter_dir)).sha256
    assert (entry["peft_type"], entry["r"], entry["lora_alpha"]) == ("LORA", 4, 8)
    assert sorted(entry["target_modules"]) == sorted(TARGETS)
    assert {f"adapter/{k}": v for k, v in files.items()}.items() <= source["files"].items()


def test_the_base_cannot_be_exported_into_the_adapters_bundle(adapter_bundle, tiny_model_dir, capsys):
    rc = cli.main(["export", str(tiny_model_dir), "--quant", "fp32", "--out", str(adapter_bundle), "--no-progress"])
    assert rc == 2 and "exported from another checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- bad adapters


def _write_config(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_not_an_adapter(tmp_path):
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        resolve_adapter(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a folder"):
        resolve_adapter(str(tmp_path / "nope"))


def test_only_lora_is_merged(tmp_path):
    with pytest.raises(ConfigError, match="'IA3' adapter; only LoRA"):
        resolve_adapter(str(_write_config(tmp_path / "ia3", peft_type="IA3")))


def test_adapter_without_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="has no weights"):
        resolve_adapter(str(_write_config(tmp_path / "a", peft_type="LORA", r=4)))


def test_hub_adapter_offline_is_a_one_line_error():
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as info:
        resolve_adapter("someone/smolvlm-lora-that-is-not-cached")
    assert "\n" not in str(info.value)


def test_adapter_for_another_model_does_not_fit(tiny_model_dir, tmp_path):
    lora = build_lora(tiny_model_dir, tmp_path / "lora", targets=["q_proj"])
    config = json.loads((lora / "adapter_config.json").read_text())
    config["target_modules"] = ["attn_c_proj"]  # a GPT-2 layer name: nothing in SmolVLM matches
    (lora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="does not fit this model"):
        merge_adapter(_base_model(tiny_model_dir), resolve_adapter(str(lora)))
