"""Find and load a SmolVLM / SmolVLM2 checkpoint: a hub id (+ revision) or a local folder.

Hub ids go through huggingface_hub's cache (``snapshot_download``), which honours ``HF_TOKEN``,
``HF_HOME`` and ``HF_HUB_OFFLINE``.  The model is described by reading its config, never by assuming
the 2.2B: the same code serves SmolVLM2-2.2B/500M/256M and SmolVLM v1.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from smoledge.errors import ConfigError, ModelLoadError
from smoledge.runtime.bundle import sha256_file

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("smolvlm", "idefics3")
_SOURCE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                 "video_preprocessor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.json", "chat_template.jinja")


@dataclass(frozen=True)
class Checkpoint:
    """Where a checkpoint lives on disk and where it came from."""

    path: Path
    model_id: str
    revision: str | None
    file_hashes: dict[str, str]


def resolve(model: str, revision: str | None = None) -> Checkpoint:
    """A local folder as is; anything else as a hub id through the huggingface_hub cache."""
    local = Path(model).expanduser()
    if local.is_dir():
        if revision:
            log.warning("--revision is ignored for a local folder")
        return Checkpoint(local.resolve(), str(local.resolve()), _local_revision(local), _hash_files(local))
    if local.exists() or model.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {model} is not a folder", hint="give a checkpoint folder or a hub id")
    return _from_hub(model, revision)


def _from_hub(repo_id: str, revision: str | None) -> Checkpoint:
    path = hub_snapshot(repo_id, revision, ["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model"])
    # The snapshot folder name is the resolved commit hash.
    return Checkpoint(path, repo_id, path.name, _hash_files(path))


def hub_snapshot(repo_id: str, revision: str | None, allow_patterns: list[str], *, kind: str = "model",
                 revision_flag: str = "--revision") -> Path:
    """A Hub repo's files through the huggingface_hub cache (HF_TOKEN, HF_HUB_OFFLINE honoured), each
    failure as a one-line ``ModelLoadError`` that names the ``kind`` of repo and the flag to fix."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    label = "" if kind == "model" else f"{kind} "
    name = f"{repo_id}{'@' + revision if revision else ''}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except hf_errors.LocalEntryNotFoundError:
        raise ModelLoadError(f"{label}{name} is not in the local Hugging Face cache and the Hub cannot be reached",
                             hint="connect and retry, unset HF_HUB_OFFLINE, or pass a local folder") from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelLoadError(f"no {kind} {repo_id!r} on the Hub (or no access)",
                             hint=f"check the id, or set HF_TOKEN for a gated/private {kind}") from None
    except hf_errors.RevisionNotFoundError:
        raise ModelLoadError(f"{label}{repo_id} has no revision {revision!r}", hint=f"check {revision_flag}") from None
    except (hf_errors.HfHubHTTPError, OSError) as err:
        raise ModelLoadError(f"could not download {label}{name}: {err}",
                             hint="check the network and HF_TOKEN") from None


def _local_revision(folder: Path) -> str | None:
    marker = folder / ".smoledge-built"
    return f"built:{marker.read_text().strip()}" if marker.is_file() else None


def _hash_files(folder: Path) -> dict[str, str]:
    hashes = {}
    for name in _SOURCE_FILES + tuple(sorted(p.name for p in folder.glob("*.safetensors"))):
        path = folder / name
        if path.is_file():
            hashes[name] = sha256_file(path)
    return hashes


def read_config(checkpoint: Checkpoint) -> dict:
    try:
        config = json.loads((checkpoint.path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read config.json of {checkpoint.model_id}: {err}",
                             hint="is this a transformers checkpoint folder?") from None
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{checkpoint.model_id} is a {config.get('model_type')!r} model; smoledge exports "
                          f"{' / '.join(SUPPORTED_MODEL_TYPES)} (SmolVLM, SmolVLM2) checkpoints")
    return config


def load_model(checkpoint: Checkpoint):
    """The model in float32 with eager attention (what every graph is traced from and compared with)."""
    import torch
    from transformers import AutoModelForImageTextToText

    read_config(checkpoint)
    try:
        model = AutoModelForImageTextToText.from_pretrained(checkpoint.path, dtype=torch.float32,
                                                            attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the weights of {checkpoint.model_id}: {err}") from None
    return model.eval()


def load_processor(checkpoint: Checkpoint):
    """The checkpoint's processor.  SmolVLMProcessor needs torchvision for its video processor, which does
    not install beside torch 2.13; Idefics3Processor with the PIL image processor gives the same input_ids
    and pixel values, so it stands in where SmolVLMProcessor cannot load."""
    from transformers import AutoProcessor, AutoTokenizer, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    try:
        return AutoProcessor.from_pretrained(checkpoint.path)
    except (ImportError, OSError, ValueError, TypeError) as err:
        log.info("AutoProcessor failed (%s); using Idefics3Processor with the PIL image processor", err)
    try:
        pre = json.loads((checkpoint.path / "preprocessor_config.json").read_text())
        image_processor = Idefics3ImageProcessorPil(**{k: v for k, v in pre.items()
                                                       if not k.startswith(("image_processor_type", "processor_class",
                                                                            "video_", "num_frames", "fps"))})
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    except (OSError, ValueError, json.JSONDecodeError, TypeError) as err:
        raise ModelLoadError(f"cannot load the processor of {checkpoint.model_id}: {err}") from None
    proc_cfg = _read_json(checkpoint.path / "processor_config.json")
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                             image_seq_len=proc_cfg.get("image_seq_len", 64),
                             chat_template=getattr(tokenizer, "chat_template", None))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
