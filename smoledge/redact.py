"""The sanitiser for text that leaves the process: no token ever reaches a message, a log or an HTTP body.

``redact(text)`` removes bearer tokens (``Bearer xxx``, ``Authorization: xxx``), Hugging Face tokens
(``hf_...``, ``api_...``) and URL userinfo (``https://user:secret@host`` -> ``https://***@host``),
and any secret registered with :func:`register_secret` (the configured HF token, the server's API
key).  It is applied where text leaves: the CLI's error line, the server's error bodies, and its
logs (:class:`RedactingFilter`).  An upstream router that echoes the request's Authorization header
back in its error text therefore shows ``***`` instead.
"""

from __future__ import annotations

import logging
import re
import threading

MASK = "***"
_PATTERNS = (
    re.compile(r"(?i)(\bbearer\s+)[^\s\"',;]+"),
    re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?)(?!bearer\b)[^\s\"',;]+"),
    re.compile(r"()\bhf_[A-Za-z0-9_\-]{6,}"),
    re.compile(r"()\bapi_(?:org_)?[A-Za-z0-9]{16,}"),
    re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://)[^/\s@\"']+@"),
)
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(secret: str | None) -> None:
    """Mask this exact string wherever it appears (tokens too short or odd for the patterns)."""
    if secret and len(secret) >= 4:
        with _lock:
            _secrets.add(secret)


def redact(text: str) -> str:
    if not text:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: f"{m.group(1)}{MASK}" + ("@" if m.group(0).endswith("@") else ""), text)
    return text


def checked_token(token: str) -> str:
    """``token``, registered for masking; a token that cannot go in an HTTP header is a one-line error."""
    from smoledge.errors import CloudAuthError

    register_secret(token)
    if not token.isascii() or not token.isprintable() or any(ch.isspace() for ch in token):
        raise CloudAuthError("the Hugging Face token holds non-ASCII, space or control characters, so it cannot "
                             "be sent", hint="copy the token again from huggingface.co/settings/tokens into HF_TOKEN")
    return token


class RedactingFilter(logging.Filter):
    """A logging filter that sanitises each record's message (and its traceback text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_filter(*names: str) -> None:
    """Add the filter to these loggers and their handlers (idempotent)."""
    for name in names or ("",):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, RedactingFilter) for f in target.filters):
                target.addFilter(RedactingFilter())
