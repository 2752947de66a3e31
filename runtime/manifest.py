"""The bundle manifest as types: the one contract between export and the runtimes.

Every section is a frozen dataclass; :meth:`Manifest.from_dict` checks a parsed ``manifest.json``
against them and raises ONE :class:`~smoledge.errors.BundleError` listing every mismatch (a missing
key, a wrong type, an unknown key), :meth:`Manifest.to_dict` writes it back.  Export writes through
these types; the runtime, the cloud fallback and the benchmarks read through them, never through raw
keys.  :func:`json_schema` publishes the same types as a JSON Schema (``manifest.schema.json`` beside
this file) so another language validates the same bundles.

Every artifact section has one shape: the three graphs under their shared logical names
(:data:`GRAPH_NAMES`), one capacity field (``context_capacity``: the KV positions the artifact holds,
None = the model's ``context_length``), the recipe, the weight bytes; then a few keys of its own format.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from smoledge.errors import BundleError, SmolEdgeError
from smoledge.runtime.preprocess import ImageProcessorConfig
from smoledge.runtime.video import VideoConfig

# 3: the ONNX decoder is GroupQueryAttention over a shared KV buffer, takes logits_to_keep, no position_ids
SCHEMA_VERSION = 3
GRAPH_NAMES = ("vision_encoder", "embed_tokens", "decoder")
SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")


def _keys(*names: str) -> dict:
    """Field metadata: a ``dict`` field that holds exactly these keys."""
    return {"keys": names}


@dataclass(frozen=True)
class Source:
    model_id: str
    revision: str | None
    files: dict[str, str]  # checkpoint file -> sha256
    adapter: dict[str, Any] | None  # the merged PEFT adapter's record (smoledge.export.adapter)


@dataclass(frozen=True)
class TextModel:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


@dataclass(frozen=True)
class VisionModel:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int


@dataclass(frozen=True)
class Model:
    model_type: str
    architecture: str
    scale_factor: int
    image_seq_len: int
    text: TextModel
    vision: VisionModel


@dataclass(frozen=True)
class Tokens:
    image: str
    fake_image: str
    global_image: str
    image_token_id: int
    bos_token: str | None
    bos_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    pad_token_id: int | None


@dataclass(frozen=True)
class CheckpointSampling:
    """The sampling values the checkpoint's generation_config.json sets (None: it leaves that one unset)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = field(metadata={"min_items": 1})
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    # what the checkpoint's generation_config.json sets; None: it has none, or sets no sampling value.  The CLI
    # and the server start from it (smoledge.runtime.defaults); the four fields above are the library's greedy.
    checkpoint: CheckpointSampling | None = None


@dataclass(frozen=True)
class MeasuredMemory:
    """Peak resident memory of one format's runtime, measured in child processes (runtime/memory_probe.py).

    A request's peak is ``fixed_bytes + prefill_bytes_per_token * P + attention_bytes_per_token_squared * P**2
    + decode_bytes_per_token * N + vision_bytes_per_batch_tile * min(T, vision_batch) + vision_bytes_per_tile
    * T`` for P prompt tokens, N new tokens and T image tiles or video frames."""

    fixed_bytes: int = field(metadata={"minimum": 0})  # the loaded process answering a minimal request
    prefill_bytes_per_token: int = field(metadata={"minimum": 0})
    attention_bytes_per_token_squared: float = field(metadata={"minimum": 0})  # attention scores at prefill
    decode_bytes_per_token: int = field(metadata={"minimum": 0})
    vision_bytes_per_batch_tile: int = field(metadata={"minimum": 0})  # per tile of one encoder call's batch
    vision_bytes_per_tile: int = field(metadata={"minimum": 0})  # pixels and features, every tile
    vision_batch: int = field(metadata={"minimum": 1})  # tiles per vision-encoder call when measured
    load_bytes: int = field(metadata={"minimum": 0})  # resident right after load
    probes: tuple[dict[str, int], ...]  # the measured requests the figures were fitted on

    @classmethod
    def from_dict(cls, data: Any, where: str = "memory.measured") -> MeasuredMemory:
        errors: list[str] = []
        figures = _parse(cls, data, where, errors)
        if errors:
            raise BundleError(f"{where} does not match the schema: {'; '.join(errors[:5])}",
                              hint="measure again (re-export, or `smoledge doctor --bundle B --calibrate`)")
        return figures

    def peak_bytes(self, prompt_tokens: int, new_tokens: int, tiles: int, vision_batch: int | None = None) -> int:
        batch = vision_batch or self.vision_batch
        return int(self.fixed_bytes + self.prefill_bytes_per_token * prompt_tokens
                   + self.attention_bytes_per_token_squared * prompt_tokens ** 2
                   + self.decode_bytes_per_token * new_tokens
                   + self.vision_bytes_per_batch_tile * min(tiles, batch) + self.vision_bytes_per_tile * tiles)


@dataclass(frozen=True)
class Memory:
    """What the router needs to estimate a request's peak memory."""

    weight_bytes: int  # the largest format's weights
    kv_bytes_per_token: int
    vision_bytes_per_tile: int
    activation_bytes: int  # one decoder step's activations besides the KV cache
    notes: str
    # format -> its measured figures; empty in bundles exported before they were measured (the formula above
    # is used for those)
    measured: dict[str, MeasuredMemory] = field(default_factory=dict)


@dataclass(frozen=True)
class Cloud:
    """The cloud targets for this model (None / () = the package defaults)."""

    substitute_model: str | None
    alternatives: tuple[str, ...]


@dataclass(frozen=True)
class TokenizerFile:
    file: str


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int = field(metadata={"minimum": 0})


@dataclass(frozen=True)
class Tensor:
    shape: tuple[int | str, ...]  # a str is a symbolic dim
    dtype: str | None


@dataclass(frozen=True)
class Graph:
    """One of the three graphs of an artifact, under its logical name."""

    file: str  # what is loaded: the .onnx, the .pte (the three graphs share it), the .mlpackage folder
    method: str | None  # the program's name inside ``file`` (ExecuTorch's runner names), else None
    files: tuple[str, ...]  # every bundle file it needs: ``file``, .data sidecars, package contents
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    states: dict[str, Tensor]  # Core ML model state (the KV cache), else empty
    dims: dict[str, tuple[int, ...]]  # flexible dim -> [min, max] (Core ML), else empty
    precision: str | None
    bytes: int | None  # None where the graphs share one file (ExecuTorch)
    quantization: dict[str, Any] | None  # the quantizer's report of what the graph holds

    @property
    def bits_per_weight(self) -> float | None:
        value = (self.quantization or {}).get("bits_per_weight")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def weight_count(self) -> int | None:
        """Weights the quantization report counts (ONNX: ``weights``, Core ML: ``parameters``)."""
        report = self.quantization or {}
        value = report.get("weights") or report.get("parameters")
        return int(value) if isinstance(value, int) else None


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """What every format's section holds; a format adds its own keys in a subclass."""

    format: str
    graphs: dict[str, Graph] = field(metadata=_keys(*GRAPH_NAMES))
    # KV positions the artifact holds; None = the model's context_length
    context_capacity: int | None = field(metadata={"minimum": 1})
    recipe: dict[str, Any]
    weight_bytes: int
    runtime: dict[str, Any]

    @property
    def recipe_name(self) -> str | None:
        name = self.recipe.get("name")
        return name if isinstance(name, str) else None

    def capacity(self, context_length: int) -> int:
        """The tokens this artifact can serve for a model whose window is ``context_length``."""
        if self.context_capacity is None:
            return context_length
        return min(context_length, self.context_capacity)


@dataclass(frozen=True, kw_only=True)
class OnnxArtifact(Artifact):
    ort_fusions: str | None


@dataclass(frozen=True, kw_only=True)
class ExecutorchArtifact(Artifact):
    constant_methods: dict[str, Any]
    kv_cache: dict[str, Any]
    delegate: dict[str, Any]
    quantization: dict[str, Any]
    precision: str
    bytes: int


@dataclass(frozen=True)
class AttentionMask:
    kind: str
    shape: tuple[int | str, ...]
    allowed: float
    masked: float


@dataclass(frozen=True, kw_only=True)
class CoreMLArtifact(Artifact):
    attention_mask: AttentionMask
    cache: dict[str, Any]
    full_tiles_only: bool
    deployment_target: dict[str, str]
    specification_version: int
    compute_precision: str
    compression: str


ARTIFACT_TYPES: dict[str, type[Artifact]] = {
    "onnx": OnnxArtifact,
    "executorch": ExecutorchArtifact,
    "coreml": CoreMLArtifact,
}


@dataclass(frozen=True)
class Manifest:
    schema_version: int = field(metadata={"const": SCHEMA_VERSION})
    smoledge_version: str
    created: str
    source: Source
    model: Model
    context_length: int
    image: ImageProcessorConfig
    video: VideoConfig | None
    tokens: Tokens
    chat_template: str
    generation: Generation
    memory: Memory
    cloud: Cloud
    tokenizer: TokenizerFile
    artifacts: dict[str, Artifact] = field(metadata={"formats": True})
    files: dict[str, FileEntry]

    @property
    def formats(self) -> list[str]:
        return sorted(self.artifacts)

    @classmethod
    def from_dict(cls, data: Any, where: str = "the bundle") -> Manifest:
        """Check ``data`` (parsed JSON) against the schema; one :class:`BundleError` lists every mismatch."""
        if not isinstance(data, dict):
            raise BundleError(f"the manifest of {where} is not a JSON object", hint="re-export the bundle")
        check_version(data.get("schema_version"), where)
        errors: list[str] = []
        manifest = _parse(cls, data, "", errors)
        if errors:
            shown = "; ".join(errors[:25]) + (f"; ... ({len(errors) - 25} more)" if len(errors) > 25 else "")
            raise BundleError(f"the manifest of {where} does not match schema {SCHEMA_VERSION} "
                              f"({len(errors)} problem{'s' * (len(errors) > 1)}): {shown}",
                              hint="re-export the bundle with this smoledge version")
        return manifest

    def to_dict(self) -> dict[str, Any]:
        return _dump(self)


def file_table(data: Any, where: str) -> dict[str, FileEntry]:
    """Only the ``files`` section of a parsed manifest, checked against its type (a zip is sized by it before
    anything is extracted; the whole manifest is checked once the bundle is opened)."""
    errors: list[str] = []
    files = data.get("files") if isinstance(data, dict) else None
    table = _parse(dict[str, FileEntry], files, "files", errors)
    if errors:
        raise BundleError(f"the manifest in {where} has no valid 'files' table (path -> size, sha256): "
                          f"{'; '.join(errors[:5])}", hint="re-export the bundle")
    return table


def check_version(version: Any, where: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"the manifest of {where} has no schema_version", hint="re-export the bundle")
    if version > SCHEMA_VERSION:
        raise BundleError(f"bundle {where} uses manifest schema {version}, newer than this smoledge reads "
                          f"({SCHEMA_VERSION})",
                          hint="upgrade smoledge: git pull in its clone, then pip install -e .")
    if version < SCHEMA_VERSION:
        raise BundleError(f"bundle {where} uses manifest schema {version}, older than this smoledge reads "
                          f"({SCHEMA_VERSION})", hint=f"re-export it with this smoledge version (schema {SCHEMA_VERSION})")


# ---------------------------------------------------------------------------------------------- parsing
_INVALID = object()
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def _json_name(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(tp: Any, value: Any, path: str, errors: list[str], meta: dict | None = None) -> Any:
    meta = meta or {}
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, path, errors)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _parse(options[0], value, path, errors, meta)
        if any(_accepts(option, value) for option in args):  # int | str: plain values only
            return value
        return _fail(errors, path, " or ".join(_type_name(a) for a in args), value)
    if origin in (tuple, list):
        if not isinstance(value, list):
            return _fail(errors, path, "an array", value)
        if len(value) < meta.get("min_items", 0):
            errors.append(f"{path}: must not be empty")
        items = [_parse(args[0], v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        return _parse_mapping(args[1], value, path, errors, meta)
    if tp is Any:
        return value
    if not _accepts(tp, value):
        return _fail(errors, path, _type_name(tp), value)
    if "const" in meta and value != meta["const"]:
        errors.append(f"{path}: must be {meta['const']}, got {value!r}")
    if "minimum" in meta and value < meta["minimum"]:
        errors.append(f"{path}: must be at least {meta['minimum']}, got {value!r}")
    return float(value) if tp is float else value


def _parse_mapping(value_type: Any, value: Any, path: str, errors: list[str], meta: dict) -> Any:
    if not isinstance(value, dict):
        return _fail(errors, path, "an object", value)
    out = {}
    if "keys" in meta:
        missing = [k for k in meta["keys"] if k not in value]
        unknown = [k for k in value if k not in meta["keys"]]
        errors.extend(f"{_at(path, k)}: missing" for k in missing)
        errors.extend(f"{_at(path, k)}: unknown key (expected one of {', '.join(meta['keys'])})" for k in unknown)
    if meta.get("formats"):
        if not value:
            errors.append(f"{path}: no format (at least one of {', '.join(ARTIFACT_TYPES)})")
        for key, item in value.items():
            if key not in ARTIFACT_TYPES:
                errors.append(f"{_at(path, key)}: unknown format (known: {', '.join(ARTIFACT_TYPES)})")
                continue
            out[key] = _parse(ARTIFACT_TYPES[key], item, _at(path, key), errors)
            if isinstance(item, dict) and item.get("format", key) != key:
                errors.append(f"{_at(path, key)}.format: must be {key!r}, got {item.get('format')!r}")
        return out
    for key, item in value.items():
        if not isinstance(key, str):
            errors.append(f"{path}: keys must be strings")
        out[key] = _parse(value_type, item, _at(path, str(key)), errors)
    return out


def _parse_dataclass(cls, value: Any, path: str, errors: list[str]) -> Any:
    if not isinstance(value, dict):
        return _fail(errors, path or "manifest", "an object", value)
    hints, fields, kwargs, before = _hints(cls), dataclasses.fields(cls), {}, len(errors)
    for f in fields:
        if f.name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{_at(path, f.name)}: missing")
            continue
        kwargs[f.name] = _parse(hints[f.name], value[f.name], _at(path, f.name), errors, dict(f.metadata))
    known = {f.name for f in fields}
    errors.extend(f"{_at(path, k)}: unknown key" for k in value if k not in known)
    if len(errors) > before:
        return _INVALID
    try:
        return cls(**kwargs)
    except SmolEdgeError as err:  # a section's own checks (ImageProcessorConfig, VideoConfig)
        errors.append(f"{path}: {err.message}")
        return _INVALID


def _accepts(tp: Any, value: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return _JSON_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _fail(errors: list[str], path: str, expected: str, value: Any) -> Any:
    errors.append(f"{path}: expected {expected}, got {_json_name(value)}")
    return _INVALID


def _dump(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _dump(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------- JSON Schema
def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (draft 2020-12), generated from the types above."""
    defs: dict[str, Any] = {}
    _schema_of(Manifest, defs)
    root = defs.pop("Manifest")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://smoledge.dev/manifest-{SCHEMA_VERSION}.schema.json",
            "title": "smoledge bundle manifest", "description": (__doc__ or "").strip().splitlines()[0],
            **root, "$defs": dict(sorted(defs.items()))}


def write_json_schema(path: Path = SCHEMA_FILE) -> Path:
    path.write_text(json.dumps(json_schema(), indent=2) + "\n")
    return path


def _schema_of(tp: Any, defs: dict, meta: dict | None = None) -> dict[str, Any]:
    meta = meta or {}
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder against recursion
            defs[tp.__name__] = _object_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema_of(a, defs, None if a is type(None) else meta) for a in args]}
    if origin in (tuple, list):
        out = {"type": "array", "items": _schema_of(args[0], defs)}
        return {**out, "minItems": meta["min_items"]} if "min_items" in meta else out
    if origin is dict:
        return _mapping_schema(args[1], defs, meta)
    if tp is Any:
        return {}
    out = {"type": {int: "integer", float: "number", bool: "boolean", str: "string", type(None): "null"}[tp]}
    return {**out, **{k: meta[k] for k in ("const", "minimum") if k in meta}}


def _mapping_schema(value_type: Any, defs: dict, meta: dict) -> dict[str, Any]:
    if meta.get("formats"):
        return {"type": "object", "minProperties": 1, "additionalProperties": False,
                "properties": {k: _schema_of(t, defs) for k, t in ARTIFACT_TYPES.items()}}
    if "keys" in meta:
        item = _schema_of(value_type, defs)
        return {"type": "object", "properties": {k: item for k in meta["keys"]}, "required": list(meta["keys"]),
                "additionalProperties": False}
    return {"type": "object", "additionalProperties": _schema_of(value_type, defs)}


def _object_schema(cls, defs: dict) -> dict[str, Any]:
    hints, fields = _hints(cls), dataclasses.fields(cls)
    props = {f.name: _schema_of(hints[f.name], defs, dict(f.metadata)) for f in fields}
    if cls in ARTIFACT_TYPES.values():
        props["format"] = {"const": next(k for k, t in ARTIFACT_TYPES.items() if t is cls)}
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    doc = (cls.__doc__ or "").strip()
    head = {"description": doc.splitlines()[0]} if doc and not doc.startswith(cls.__name__ + "(") else {}
    return {**head, "type": "object", "properties": props, "required": required, "additionalProperties": False}
