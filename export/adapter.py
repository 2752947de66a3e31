"""Fine-tuned checkpoints: merge a PEFT LoRA adapter into the weights before export.

``smoledge export MODEL --adapter PATH_OR_HUB_ID`` loads the base model, applies the adapter with peft
(``PeftModel.from_pretrained``) and folds it into the weights with peft's own
``merge_and_unload(safe_merge=True)`` (which refuses NaN results), so every export target sees plain
weights: no graph, quantizer or runtime knows about LoRA.

An adapter is a folder or a Hub id holding ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``.bin``), as ``PeftModel.save_pretrained`` writes them.  The checkpoint's tokenizer, processor and chat
template are used as they are: an adapter that resized the vocabulary does not fit and is refused.
The manifest records the adapter in ``source.adapter`` (:meth:`Adapter.manifest_entry`) and its files'
hashes in ``source.files`` under ``adapter/``, so a later export into the same bundle folder cannot mix
weights with and without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from smoledge.errors import ConfigError, ExportError, ModelLoadError, install_hint
from smoledge.export.loader import Checkpoint, hub_snapshot, sha256_file

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
SUPPORTED_PEFT_TYPES = ("LORA",)


@dataclass(frozen=True)
class Adapter:
    """Where an adapter lives on disk, where it came from, and what it says about itself."""

    path: Path
    adapter_id: str
    revision: str | None
    file_hashes: dict[str, str]
    config: dict

    @property
    def sha256(self) -> str:
        """One hash for the adapter: sha256 over ``"<file> <sha256>\\n"`` of its files, sorted by name."""
        lines = "".join(f"{name} {digest}\n" for name, digest in sorted(self.file_hashes.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

    def manifest_entry(self) -> dict:
        c = self.config
        return {
            "id": self.adapter_id, "revision": self.revision, "sha256": self.sha256, "files": self.file_hashes,
            "peft_type": c.get("peft_type"), "base_model": c.get("base_model_name_or_path"),
            "r": c.get("r"), "lora_alpha": c.get("lora_alpha"), "use_rslora": c.get("use_rslora", False),
            "use_dora": c.get("use_dora", False), "target_modules": _as_list(c.get("target_modules")),
            "modules_to_save": _as_list(c.get("modules_to_save")),
        }


def _as_list(value) -> list | str | None:
    return sorted(value) if isinstance(value, (list, tuple, set)) else value


def resolve_adapter(spec: str, revision: str | None = None) -> Adapter:
    """A local adapter folder as is; anything else as a Hub id through the huggingface_hub cache."""
    local = Path(spec).expanduser()
    if local.is_dir():
        if revision:
            log.warning("--adapter-revision is ignored for a local adapter folder")
        return _read_adapter(local.resolve(), str(local.resolve()), None)
    if local.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"adapter path {spec} is not a folder",
                             hint="give the folder PeftModel.save_pretrained wrote, or a Hub id")
    path = hub_snapshot(spec, revision, [CONFIG_FILE, *WEIGHT_FILES], kind="adapter",
                        revision_flag="--adapter-revision")
    return _read_adapter(path, spec, path.name)  # the snapshot folder name is the resolved commit


def _read_adapter(folder: Path, adapter_id: str, revision: str | None) -> Adapter:
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{adapter_id} has no {CONFIG_FILE}; it is not a PEFT adapter",
                             hint="give the folder PeftModel.save_pretrained wrote") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {CONFIG_FILE} of adapter {adapter_id}: {err}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{CONFIG_FILE} of adapter {adapter_id} is not a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise ConfigError(f"adapter {adapter_id} is a {config.get('peft_type')!r} adapter; only LoRA adapters "
                          "(peft_type LORA) are merged", hint="train a LoRA adapter, or merge it yourself first")
    weights = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise ModelLoadError(f"adapter {adapter_id} has no weights ({' or '.join(WEIGHT_FILES)})",
                             hint="the folder must hold what PeftModel.save_pretrained wrote")
    hashes = {name: sha256_file(folder / name) for name in (CONFIG_FILE, weights[0])}
    return Adapter(folder, adapter_id, revision, hashes, config)


def merge_adapter(model, adapter: Adapter):
    """``model`` with ``adapter`` folded into its weights (peft ``merge_and_unload``), in eval mode."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError("--adapter needs peft, which is not installed",
                          hint=install_hint("export")) from None
    base = adapter.config.get("base_model_name_or_path")
    if base:
        log.info("merging adapter %s (trained on %s)", adapter.adapter_id, base)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
        merged = peft_model.merge_and_unload(safe_merge=True)
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        detail = " ".join(str(err).split())[:300]
        raise ExportError(f"adapter {adapter.adapter_id} does not fit this model ({type(err).__name__}: {detail})",
                          hint="use the adapter with the base model it was trained on") from None
    return merged.eval()


def with_adapter(checkpoint: Checkpoint, adapter: Adapter) -> Checkpoint:
    """The checkpoint with the adapter's file hashes added under ``adapter/`` (they key the bundle folder)."""
    files = {**checkpoint.file_hashes, **{f"adapter/{k}": v for k, v in adapter.file_hashes.items()}}
    return replace(checkpoint, file_hashes=files)
