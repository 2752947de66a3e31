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

from smoledge.errors import BackendUnavailableError, ConfigError, install_hint

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

    def parse(self, text: str, given_as: str | None = None) -> Any:
        """The option's value from the flag's text (``given_as``: the flag name the user typed, for errors)."""
        if self.kind == "choice":
            return None if text == "none" else text
        if text == "full":
            return None
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"{given_as or self.flag} takes a positive number of tokens or 'full', got {text!r}")
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
                              hint=install_hint("export")) from None

    def options_from_flags(self, values: dict[str, str], given_as: dict[str, str] | None = None):
        """The target's options object from the flags' string values (flag dest -> text; ``given_as``: dest ->
        the flag name the user typed, where it was an alias)."""
        target = self.export_target()
        given_as = given_as or {}
        parsed = {f.option: f.parse(values[dest(f)], given_as.get(dest(f))) for f in self.export_flags
                  if dest(f) in values}
        return getattr(target, self.export_options)(**parsed)


def dest(flag: ExportFlag) -> str:
    return flag.flag.removeprefix("--").replace("-", "_")


CONTEXT_HELP = ("KV-cache capacity in tokens, or 'full' for the model's whole context window (default 2048): the "
                "static cache of ExecuTorch's .pte and Core ML's state; ONNX's cache grows as needed")

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
        export_flags=(ExportFlag("--context", "max_context_len", "2048", CONTEXT_HELP, "tokens"),),
        threads=True, parity="runtime", install=install_hint("executorch"), requires=("executorch",)),
    "coreml": FormatSpec(
        "coreml", "three stateful .mlpackage for Core ML (iOS 18 / macOS 15)",
        target="smoledge.export.target_coreml", quantizer="smoledge.quantize.coreml_quant",
        backend="smoledge.runtime.backends.coreml", artifact="CoreMLArtifact",
        export_options="CoreMLTargetOptions",
        export_flags=(ExportFlag("--context", "context", "2048", CONTEXT_HELP, "tokens"),
                      ExportFlag("--coreml-compression", "compression", "linear", "Core ML: blockwise linear "
                                 "quantization or k-means palettization (default linear)",
                                 choices=("linear", "palettize"))),
        parity="wrapper", install=install_hint("coreml") + " (macOS 15+)", requires=("coremltools",),
        platforms=("darwin",)),
}


def format_spec(name: str) -> FormatSpec:
    if name not in FORMATS:
        raise ConfigError(f"unknown format {name!r}; available: {', '.join(FORMATS)}")
    return FORMATS[name]


def backend_options(name: str, *, threads: int = 0, providers: tuple[str, ...] | None = None) -> dict[str, Any]:
    return format_spec(name).backend_options(threads=threads, providers=providers)


# --providers: short name -> (onnxruntime's name, what brings it).  Anything else passes through unchanged.
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": ("CPUExecutionProvider", "every onnxruntime build"),
    "cuda": ("CUDAExecutionProvider", "pip install onnxruntime-gpu (in place of onnxruntime); on a Jetson, "
             "NVIDIA's onnxruntime-gpu wheel for your JetPack (the Jetson Zoo)"),
    "tensorrt": ("TensorrtExecutionProvider", "pip install onnxruntime-gpu with TensorRT installed; on a Jetson, "
                 "NVIDIA's onnxruntime-gpu wheel for your JetPack"),
    "coreml": ("CoreMLExecutionProvider", "the onnxruntime wheel for macOS (pip install onnxruntime on a Mac)"),
    "nnapi": ("NnapiExecutionProvider", "onnxruntime-android (the Android package; not on desktop Linux)"),
    "xnnpack": ("XnnpackExecutionProvider", "an onnxruntime built with --use_xnnpack (onnxruntime-android and "
                "onnxruntime-mobile include it)"),
}


def provider_name(name: str) -> str:
    """onnxruntime's name for a short name, any case ("CUDA" -> "CUDAExecutionProvider"); others as given."""
    entry = PROVIDERS.get(name.strip().lower())
    return entry[0] if entry else name.strip()


def parse_providers(text: str | None, available: list[str] | None = None) -> tuple[str, ...] | None:
    """``--providers`` as onnxruntime's names; a provider missing from ``available`` (onnxruntime's list, when
    known) is a one-line error naming the package that brings it."""
    if not text:
        return None
    names = tuple(provider_name(p) for p in text.split(",") if p.strip())
    if not names:
        raise ConfigError("--providers is empty", hint=f"name one or more of {', '.join(PROVIDERS)}")
    missing = [n for n in names if available is not None and n not in available]
    if missing:
        brings = {full: package for full, package in PROVIDERS.values()}
        how = "; ".join(f"{n}: {brings.get(n, 'a custom onnxruntime build')}" for n in missing)
        raise BackendUnavailableError(f"execution provider {', '.join(missing)} is not in this onnxruntime build "
                                      f"(it has {', '.join(available)})", hint=how)
    return names


def onnxruntime_providers() -> list[str] | None:
    """The installed onnxruntime's execution providers, None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


def pick_backend(held: list[str] | tuple[str, ...], where: str = "the bundle") -> str:
    """The backend to run a bundle holding the formats ``held`` with, when ``--backend`` is not given: the
    first format in registry order that the bundle holds and this machine can run."""
    for name, spec in FORMATS.items():
        if name in held and spec.runs_here():
            return name
    installs = "; ".join(f"{FORMATS[n].name}: {FORMATS[n].install or 'pip install onnxruntime'}"
                         for n in held if n in FORMATS)
    raise BackendUnavailableError(f"{where} holds {', '.join(held) or 'no format'}, and no backend for "
                                  f"{'it' if len(held) == 1 else 'them'} runs on this machine",
                                  hint=installs or "re-export the bundle with --format onnx")


def add_backend_arguments(parser) -> None:
    """``--backend``, ``--providers``, ``--threads``: the same for ``run`` and ``serve``, from the format registry."""
    threaded = ", ".join(name for name, spec in FORMATS.items() if spec.threads)
    with_providers = ", ".join(name for name, spec in FORMATS.items() if spec.providers)
    parser.add_argument("--backend", default=None, choices=sorted(FORMATS),
                        help="which artifacts to run (default: the first of "
                        f"{', '.join(FORMATS)} that the bundle holds and this machine runs)")
    parser.add_argument("--providers", default=None,
                        help=f"comma-separated onnxruntime execution providers for {with_providers}: "
                        f"{', '.join(PROVIDERS)} (any case) or a full name (CUDAExecutionProvider) "
                        f"(default {','.join(FORMATS['onnx'].providers)})")
    parser.add_argument("--threads", type=int, default=0,
                        help=f"intra-op threads for {threaded} (0 = runtime default)")


def resolve_backend(args, held: list[str] | tuple[str, ...], where: str = "the bundle") -> str:
    """``--backend`` as given, else :func:`pick_backend`; stored back on ``args`` for later messages."""
    if getattr(args, "backend", None) is None:
        args.backend = pick_backend(held, where)
    return args.backend


def backend_options_from_args(args) -> dict[str, Any]:
    """The chosen backend's options; ``--providers`` checked against the installed onnxruntime first."""
    backend = args.backend or "onnx"
    available = onnxruntime_providers() if format_spec(backend).providers and args.providers else None
    providers = parse_providers(args.providers, available)
    return backend_options(backend, threads=args.threads, providers=providers)
