"""``data:<kind>/...;base64,...`` URLs, as OpenAI content parts carry images and videos."""

from __future__ import annotations

import base64
import binascii

from smoledge.errors import InputError


def decode_data_url(url: str, kind: str, error: type[InputError]) -> bytes:
    """The bytes of a base64 data URL whose media type is ``kind/...`` (``image`` or ``video``)."""
    header, _, payload = url.partition(",")
    if not header.startswith(f"data:{kind}/") or ";base64" not in header:
        raise error(f"unsupported data URL: expected data:{kind}/...;base64,...",
                    hint=f"encode the {kind} as a base64 data URL or pass its bytes")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as err:
        raise error(f"the {kind} data URL is not valid base64", hint=f"re-encode the {kind}") from err
