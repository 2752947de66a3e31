"""What the export-side commands (``smoledge export``, ``smoledge demo-model``) do before they start.

* :func:`require_export_extra`: on a runtime-only install (no extras) they stop with one line that says
  which extra to install, before anything imports torch or transformers.
* :func:`quiet_libraries`: the tracers and quantizers log at INFO/WARNING by default and the progress bar
  says enough; two messages a newcomer reads as breakage are silenced by their exact text, where they
  are raised, and nothing else of that kind is hidden (``--debug`` skips all of this):

  - torchao logs ``Failed to load .../torchao/_C_mxfp8...so: ...`` (at WARNING, on import) when its
    optional MX / CUDA kernels were built for another torch; the CPU paths smoledge uses need none.
  - torch's ``torch.utils._pytree`` warns ``isinstance(treespec, LeafSpec) is deprecated`` (a
    FutureWarning) from inside torch.export itself, about torch's own code, once per graph, and logs
    ``<enum ...> is an Enum subclass ... register_constant() ... deprecated`` (its logger, at WARNING)
    when torchao registers its enums: the ``torch.utils._pytree`` logger is set to ERROR below.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

from smoledge.errors import ConfigError, install_hint

# what `pip install -e '.[export]'` brings that every export step imports
EXPORT_PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "gguf")

_LIBRARY_LOGGERS = ("torch", "torch.utils._pytree", "torch.onnx", "torch.onnx._internal.exporter._registration",
                    "torch._dynamo", "onnxscript", "onnx_ir", "onnxruntime", "onnxruntime.quantization",
                    "transformers", "torchao", "coremltools", "executorch")


def require_export_extra(command: str, *, subject: str | None = None, alternative: str | None = None) -> None:
    """A one-line :class:`ConfigError` naming the first missing package of the ``[export]`` extra:
    "`smoledge COMMAND` needs the export extra, ...".  ``subject`` replaces "`smoledge COMMAND`" where
    the command needs the extra only for some inputs (``run`` on a checkpoint); ``alternative`` is added to
    the install hint (what to do instead)."""
    for name in EXPORT_PACKAGES:
        if importlib.util.find_spec(name) is None:
            hint = install_hint("export") + (f", {alternative}" if alternative else "")
            raise ConfigError(f"{subject or f'`smoledge {command}`'} needs the export extra, which is not "
                              f"installed ({name})", hint=hint)


class _DropTorchaoKernelNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load ") and "torchao" in message and ".so" in message)


def quiet_libraries() -> None:
    """Call before torch / transformers are imported (the torchao message is logged at import)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    logging.getLogger("torchao").addFilter(_DropTorchaoKernelNoise())
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    for name in _LIBRARY_LOGGERS:  # INFO/WARNING chatter of the libraries; their errors still show
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
