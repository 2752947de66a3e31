"""Images in chat requests to ``smoledge serve``: ``data:`` URLs always, ``http(s)`` URLs only when allowed.

A client's image string is never used as a file path: it is a ``data:image/...;base64,`` URL, or (with
``--allow-remote-images``) an ``http(s)`` URL fetched here with a size and a time limit, no redirects,
and - unless private hosts are allowed too - only from addresses that are globally routable (no
loopback, private, link-local or metadata addresses: no SSRF).  Every image is then checked: its size
in bytes and pixels, and a full decode, so a bad image is a 400 before the model is queued.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from smoledge.errors import ImageError, ImageTooLargeError
from smoledge.runtime.media import DecodedImage, MediaLimits, checked_image
from smoledge.runtime.server_errors import bad

MB = 1024 * 1024


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int = 10 * MB  # encoded size of one image
    max_image_pixels: int = 32 * 1024 * 1024  # width x height of one image (decompression bombs)
    max_images: int = 8  # per request
    allow_remote: bool = False  # fetch http(s) image URLs
    remote_timeout_s: float = 10.0  # whole fetch, connect to last byte
    allow_private_hosts: bool = False  # remote URLs may point at loopback / private addresses

    def media(self) -> MediaLimits:
        return MediaLimits(max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels)


def resolve_image(url: str, limits: ImageLimits, *, where: str, fetcher=None) -> DecodedImage:
    """The checked, encoded image bytes behind ``url``, decoded once (raises ApiError 400 for anything else)."""
    lowered = url[:8].lower()
    if lowered.startswith("data:"):
        data = decode_data_url(url, limits, where)
    elif lowered.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise bad(f"{where}: remote image URLs are not fetched by this server ({url[:60]}); send the image "
                      "as a data: URL", where, "remote_image_not_allowed")
        data = (fetcher or fetch_remote)(url, limits, where)
    else:
        raise bad(f"{where} must be a data:image/...;base64 URL (or http(s) where the server allows it)", where,
                  "invalid_image_url")
    return check_image(data, limits, where)


def decode_data_url(url: str, limits: ImageLimits, where: str) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise bad(f"{where} is not a valid data URL (no comma before the data)", where, "invalid_image_url")
    mime, *params = header.split(";")
    if not mime.strip().lower().startswith("image/"):
        raise bad(f"{where} holds {mime.strip() or 'text/plain'} data, not an image", where, "invalid_image")
    if "base64" not in (p.strip().lower() for p in params):
        raise bad(f"{where} must be base64 encoded (data:image/...;base64,...)", where, "invalid_image_url")
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > limits.max_image_bytes:
        raise _too_large(where, len(payload) // 4 * 3, limits)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{where} is not valid base64", where, "invalid_base64") from None
    if not data:
        raise bad(f"{where} holds no data", where, "invalid_image")
    return data


def check_image(data: bytes, limits: ImageLimits, where: str) -> DecodedImage:
    """Size in bytes, size in pixels (from the header), then the one full decode: every failure is a 400.
    The result carries the decoded picture, so the model does not decode it again."""
    if len(data) > limits.max_image_bytes:
        raise _too_large(where, len(data), limits)
    try:
        return checked_image(data, limits.media())
    except ImageTooLargeError as err:
        raise bad(f"{where}: {err.message} (this server's limit)", where, "image_too_large") from None
    except ImageError as err:
        raise bad(f"{where}: {err.message}", where, "invalid_image") from None


def _too_large(where: str, size: int, limits: ImageLimits):
    return bad(f"{where} is {size / MB:.1f} MiB, over this server's limit of {limits.max_image_bytes / MB:.1f} MiB "
               "per image", where, "image_too_large")


# --------------------------------------------------------------------------------------------- remote


def fetch_remote(url: str, limits: ImageLimits, where: str) -> bytes:
    """GET an image URL: no redirects, at most ``max_image_bytes``, within ``remote_timeout_s`` in all."""
    import httpx2

    parts = urlsplit(url)
    if not parts.hostname:
        raise bad(f"{where} has no host", where, "invalid_image_url")
    if not limits.allow_private_hosts:
        _require_public(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), where)
    deadline = time.monotonic() + limits.remote_timeout_s
    try:
        with httpx2.Client(timeout=limits.remote_timeout_s, follow_redirects=False, trust_env=False) as client:
            with client.stream("GET", url, headers={"Accept": "image/*"}) as response:
                if response.status_code != 200:
                    raise bad(f"{where}: fetching the image gave HTTP {response.status_code} (redirects are not "
                              "followed)", where, "image_fetch_failed")
                return _read_limited(response, limits, where, deadline)
    except httpx2.TimeoutException:
        raise _slow(where, limits) from None
    except httpx2.HTTPError as err:
        raise bad(f"{where}: the image could not be fetched ({type(err).__name__})", where,
                  "image_fetch_failed") from None


def _read_limited(response, limits: ImageLimits, where: str, deadline: float) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_image_bytes:
        raise _too_large(where, int(declared), limits)
    buf = bytearray()
    for piece in response.iter_bytes():
        buf += piece
        if len(buf) > limits.max_image_bytes:
            raise _too_large(where, len(buf), limits)
        if time.monotonic() > deadline:
            raise _slow(where, limits)
    return bytes(buf)


def _slow(where: str, limits: ImageLimits):
    return bad(f"{where}: the image did not arrive within {limits.remote_timeout_s:g} s", where, "image_fetch_timeout")


def _require_public(host: str, port: int, where: str) -> None:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise bad(f"{where}: the host {host!r} cannot be resolved", where, "image_fetch_failed") from None
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not address.is_global:
            raise bad(f"{where}: {host} resolves to the non-public address {address}; refused", where,
                      "remote_image_not_allowed")
