"""The format registry: one descriptor per bundle format.

A :class:`FormatSpec` joins what a format is on both sides of the bundle: the export target module, the
quantizer that maps a recipe onto it, the runtime backend, its manifest section type, the export flags
its target takes, which runtime options its backend takes (a thread count, onnxruntime execution
providers) and the parity it declares.  The export and run CLIs, ``serve``, ``bundle info``, the
benchmarks and the parity tests iterate :data:`FORMATS`; adding a format is its modules plus one entry
here (see the README's developer notes).

Modules (and the manifest section type) are named, not imported: the runtime installs without the
exporter, and every ``smoledge`` command builds its parser from this module, so it stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from smoledge.errors import BackendUnavailableError, ConfigError

Parity = Literal["runtime", "wrapper"]


@dataclass(frozen=True)
class ExportFlag:
    """One ``smoledge export`` flag and the target option it sets.

    ``kind``: ``choice`` (a string from ``choices``; ``"none"`` means None), ``tokens`` (a positive number of
    tokens, or ``full`` = None: the model's whole context window)."""

    flag: str
    option: str
    default: str
    help: str
    kind: Literal["choice", "tokens"] = "choice"
    choices: tuple[str, ...] = ()

    def parse(self, text: str) -> Any:
        if self.kind == "choice":
            return None if text == "none" else text
        if text == "full":
            return None
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"{self.flag} takes a positive number of tokens or 'full', got {text!r}")
        return int(text)


@dataclass(frozen=True)
class FormatSpec:
    name: str
    summary: str
    target: str  # export module: FORMAT, an options dataclass, default_options(), export(...) -> Artifact
    quantizer: str  # the module that maps a recipe onto this format's weights
    backend: str  # runtime module: FORMAT, load(bundle, **options)
    artifact: str  # its manifest section: a class in smoledge.runtime.manifest
    export_options: str  # the target's options dataclass (in ``target``)
    export_flags: tuple[ExportFlag, ...] = ()
    threads: bool = False  # the backend takes ``threads`` (intra-op threads; 0 = its default)
    providers: tuple[str, ...] = ()  # default onnxruntime execution providers; empty: takes no ``providers``
    # "runtime": the backend's generation is compared with transformers eager; "wrapper": only the traced
    # wrapper and the converted program can be checked here (no prediction runs on this platform)
    parity: Parity = "runtime"
    install: str = ""  # what to pip install for the backend
    requires: tuple[str, ...] = ()  # Python packages the backend imports
    platforms: tuple[str, ...] = ()  # sys.platform values the backend runs on (empty: any)

    def runs_here(self) -> bool:
        """Whether the backend can load on this machine (its packages installed, a platform it runs on)."""
        import importlib.util
        import sys

        if self.platforms and sys.platform not in self.platforms:
            return False
        return all(importlib.util.find_spec(package) is not None for package in self.requires)

    @property
    def artifact_type(self):
        from smoledge.runtime import manifest

        return getattr(manifest, self.artifact)

    def backend_options(self, *, threads: int = 0, providers: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The options this backend takes, from what the CLI or server was given."""
        options: dict[str, Any] = {}
        if self.threads:
            options["threads"] = threads
        if self.providers:
            options["providers"] = tuple(providers) if providers else self.providers
        return options

    def load_backend(self):
        try:
            return importlib.import_module(self.backend)
        except ImportError as err:
            raise BackendUnavailableError(f"the {self.name} backend needs {err.name}, which is not installed",
                                          hint=self.install or f"install it to use --backend {self.name}") from None

    def export_target(self):
        try:
            return importlib.import_module(self.target)
        except ImportError as err:
            raise ConfigError(f"the {self.name} exporter needs a package that is not installed ({err.name})",
                              hint="pip install 'smoledge[export]'") from None

    def options_from_flags(self, values: dict[str, str]):
        """The target's options object from the flags' string values (flag dest -> text)."""
        target = self.export_target()
        parsed = {f.option: f.parse(values[dest(f)]) for f in self.export_flags if dest(f) in values}
        return getattr(target, self.export_options)(**parsed)


def dest(flag: ExportFlag) -> str:
    return flag.flag.removeprefix("--").replace("-", "_")


FORMATS: dict[str, FormatSpec] = {
    "onnx": FormatSpec(
        "onnx", "three ONNX graphs, MatMulNBits INT4, for ONNX Runtime",
        target="smoledge.export.target_onnx", quantizer="smoledge.quantize.onnx_quant",
        backend="smoledge.runtime.backends.onnx", artifact="OnnxArtifact", export_options="OnnxTargetOptions",
        export_flags=(ExportFlag("--ort-fusions", "ort_fusions", "cpu", "fuse ONNX graphs into ONNX Runtime ops for "
                                 "this provider (default cpu)", choices=("cpu", "cuda", "webgpu", "dml", "none")),),
        threads=True, providers=("CPUExecutionProvider",), parity="runtime", requires=("onnxruntime",)),
    "executorch": FormatSpec(
        "executorch", "one XNNPACK .pte (torchao 8da4w) for ExecuTorch",
        target="smoledge.export.target_executorch", quantizer="smoledge.quantize.torchao_quant",
        backend="smoledge.runtime.backends.executorch", artifact="ExecutorchArtifact",
        export_options="ExecutorchTargetOptions",
        export_flags=(ExportFlag("--max-context-len", "max_context_len", "2048", "ExecuTorch: static KV-cache "
                                 "positions in tokens, or 'full' for the model's context (default 2048)", "tokens"),),
        threads=True, parity="runtime", install="pip install 'smoledge[executorch]'", requires=("executorch",)),
    "coreml": FormatSpec(
        "coreml", "three stateful .mlpackage for Core ML (iOS 18 / macOS 15)",
        target="smoledge.export.target_coreml", quantizer="smoledge.quantize.coreml_quant",
        backend="smoledge.runtime.backends.coreml", artifact="CoreMLArtifact",
        export_options="CoreMLTargetOptions",
        export_flags=(ExportFlag("--coreml-context", "context", "2048", "Core ML: KV-state capacity in tokens, or "
                                 "'full' for the model's context (default 2048)", "tokens"),
                      ExportFlag("--coreml-compression", "compression", "linear", "Core ML: blockwise linear "
                                 "quantization or k-means palettization (default linear)",
                                 choices=("linear", "palettize"))),
        parity="wrapper", install="pip install 'smoledge[coreml]' (macOS 15+)", requires=("coremltools",),
        platforms=("darwin",)),
}


def format_spec(name: str) -> FormatSpec:
    if name not in FORMATS:
        raise ConfigError(f"unknown format {name!r}; available: {', '.join(FORMATS)}")
    return FORMATS[name]


def backend_options(name: str, *, threads: int = 0, providers: tuple[str, ...] | None = None) -> dict[str, Any]:
    return format_spec(name).backend_options(threads=threads, providers=providers)


def add_backend_arguments(parser) -> None:
    """``--backend``, ``--providers``, ``--threads``: the same for ``run`` and ``serve``, from the format registry."""
    threaded = ", ".join(name for name, spec in FORMATS.items() if spec.threads)
    with_providers = ", ".join(name for name, spec in FORMATS.items() if spec.providers)
    parser.add_argument("--backend", default="onnx", choices=sorted(FORMATS), help="which artifacts to run")
    parser.add_argument("--providers", default=None,
                        help="comma-separated onnxruntime execution providers: cuda, tensorrt, coreml, nnapi, xnnpack, "
                        f"cpu, or a full name (CUDAExecutionProvider), for {with_providers} "
                        f"(default {','.join(FORMATS['onnx'].providers)})")
    parser.add_argument("--threads", type=int, default=0,
                        help=f"intra-op threads for {threaded} (0 = runtime default)")


def backend_options_from_args(args) -> dict[str, Any]:
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip()) if args.providers else None
    return backend_options(args.backend, threads=args.threads, providers=providers)
