"""Backends by bundle format.  A new backend is one module exposing ``FORMAT`` and
``load(bundle, **options)``, registered here."""

from __future__ import annotations

import importlib

from smoledge.errors import BackendUnavailableError, ConfigError

BACKENDS = {
    "onnx": "smoledge.runtime.backends.onnx",
    "executorch": "smoledge.runtime.backends.executorch",
    "coreml": "smoledge.runtime.backends.coreml",
}


def load_backend(name: str, bundle, **options):
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as err:
        raise BackendUnavailableError(f"the {name} backend needs {err.name}, which is not installed",
                                      hint=f"install it to use --backend {name}") from None
    return module.load(bundle, **options)
