"""The one exception tree of smoledge.

Every error a user can cause or meet is a :class:`SmolEdgeError`.  Its message is one line that says
what was wrong and what to do; the CLI prints exactly that line and exits non-zero (a traceback only
with ``--debug``).  The tree::

    SmolEdgeError
    ├── ConfigError            bad arguments, bad config file, unsupported model config
    ├── ModelLoadError         a checkpoint that cannot be found or read (hub, cache, local folder)
    ├── ExportError            an export step failed (graph capture, quantization, bundle writing)
    ├── BundleError            a bundle that is missing, incomplete, tampered with or too new
    ├── InputError             a request the runtime cannot take
    │   ├── ImageError         missing, unreadable or unsupported image
    │   │   └── ImageTooLargeError  an image over the byte or pixel limit
    │   ├── VideoError         missing, unreadable or unsupported video
    │   │   └── VideoDecoderMissingError  no video decoder installed here (the cloud may still take it)
    │   ├── PromptTooLongError prompt + max_new_tokens over the context window
    │   └── ParameterError     a request parameter out of range or of the wrong kind (``.param`` names it)
    ├── BackendError           local inference failed (runtime error, out of memory, missing kernels)
    │   ├── BackendUnavailableError  the backend cannot run on this platform / install
    │   └── DegenerateOutputError    NaN/Inf logits
    ├── DeadlineExceededError  a first-token or total deadline passed
    ├── CloudError             the cloud fallback failed
    │   ├── CloudAuthError         401/403: missing or bad token
    │   ├── CloudCreditError       402: out of credit
    │   ├── CloudModelError        400/404: model not served by any provider
    │   ├── CloudRateLimitError    429 after all retries
    │   ├── CloudProtocolError     malformed answer from the server
    │   └── CloudUnavailableError  unreachable, timed out, 5xx after all retries
    └── RoutingError           neither local nor cloud could serve a request
        ├── CloudDisabledError     the request needs the cloud but never-cloud is on
        └── FallbackFailedError    local failed and the cloud failed too (carries both causes)
"""

from __future__ import annotations


class SmolEdgeError(Exception):
    """Base of every smoledge error. ``str(err)`` is a one-line, user-facing message."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = " ".join(str(message).split())
        self.hint = " ".join(hint.split()) if hint else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(SmolEdgeError):
    pass


class ModelLoadError(SmolEdgeError):
    pass


class ExportError(SmolEdgeError):
    pass


class BundleError(SmolEdgeError):
    pass


class InputError(SmolEdgeError):
    pass


class ImageError(InputError):
    pass


class ImageTooLargeError(ImageError):
    pass


class VideoError(InputError):
    pass


class VideoDecoderMissingError(VideoError):
    pass


class PromptTooLongError(InputError):
    pass


class ParameterError(InputError):
    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None):
        self.param = param
        super().__init__(message, hint=hint)


class BackendError(SmolEdgeError):
    pass


class BackendUnavailableError(BackendError):
    pass


class DegenerateOutputError(BackendError):
    pass


class DeadlineExceededError(SmolEdgeError):
    pass


class CloudError(SmolEdgeError):
    pass


class CloudAuthError(CloudError):
    pass


class CloudCreditError(CloudError):
    pass


class CloudModelError(CloudError):
    pass


class CloudRateLimitError(CloudError):
    pass


class CloudProtocolError(CloudError):
    pass


class CloudUnavailableError(CloudError):
    pass


class RoutingError(SmolEdgeError):
    pass


class CloudDisabledError(RoutingError):
    pass


class FallbackFailedError(RoutingError):
    """Local inference failed and the cloud could not take over; carries both causes."""

    def __init__(self, local: BaseException, cloud: BaseException):
        self.local_cause = local
        self.cloud_cause = cloud
        super().__init__(
            f"local inference failed: {_short(local)}; cloud fallback failed too: {_short(cloud)}",
            hint="fix either cause, e.g. free memory / use a smaller image, or check the network and HF_TOKEN",
        )


def classify(err: BaseException) -> str:
    """Who is to blame for ``err``: ``"input"`` (the request: never counts against local health, never
    sent to the cloud), ``"cloud"`` (the cloud fallback) or ``"engine"`` (the local engine, or a bug).

    Bad input the runtime meets too late to have a typed error for it (a lone surrogate the tokenizer
    refuses, a seed numpy refuses) is caught before, by :mod:`smoledge.runtime.request_check`.
    """
    if isinstance(err, InputError) and not isinstance(err, (PromptTooLongError, VideoDecoderMissingError)):
        return "input"
    if isinstance(err, (CloudError, RoutingError)):
        return "cloud"
    return "engine"


def _short(err: BaseException) -> str:
    return str(err) if isinstance(err, SmolEdgeError) else f"{type(err).__name__}: {err}"


def install_hint(extra: str) -> str:
    """The one way to add an optional part: smoledge is installed from a clone (``pip install -e``), so
    ``pip install 'smoledge[serve]'`` would look for a PyPI package that does not exist."""
    return f"from the smoledge clone: pip install -e '.[{extra}]'"
