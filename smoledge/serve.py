"""``smoledge serve BUNDLE``: the device speaks OpenAI chat completions, with the cloud fallback behind it.

    smoledge serve bundle/ --port 8000 --api-key "$KEY" --profile raspberry-pi-5-8gb

``POST /v1/chat/completions`` (text and ``image_url`` data-URL parts; ``stream``; ``max_tokens`` /
``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``), ``GET /v1/models`` and
``GET /health``.  Every request goes through the local-first entry point
:func:`smoledge.cloud_fallback.answer`; the response says where it ran and why (``x-smoledge-route``
headers and a ``smoledge`` field).  ``--max-tiles auto|N`` (``$SMOLEDGE_MAX_TILES``) applies the tile budget
per request, as for ``smoledge run``: a photo that does not fit the device is answered locally with fewer
tiles (route code ``fewer-tiles``) instead of going to the cloud or being refused.  See docs/server.md.

This module only parses flags and is imported by the ``smoledge`` command on every run, so it imports
nothing heavy: the web stack (Starlette + uvicorn, the ``[serve]`` extra) and the model are loaded in
:func:`main`.  The pieces: :mod:`.server_protocol` (wire format), :mod:`.server_images` (image URLs and
limits), :mod:`.server_errors` (error bodies), :mod:`.server_worker` (one model, the queue, cancellation)
and :mod:`.server_app` (HTTP).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from smoledge.cloud_fallback import add_routing_arguments
from smoledge.errors import ConfigError, install_hint
from smoledge.runtime.formats import add_backend_arguments

if TYPE_CHECKING:
    from smoledge.runtime.manifest import Manifest

MB = 1024 * 1024


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder or .zip written by 'smoledge export'")
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    net.add_argument("--port", type=int, default=8000, help="port (0 = any free port; the chosen one is printed)")
    net.add_argument("--api-key", default=os.environ.get("SMOLEDGE_API_KEY"), metavar="K",
                     help="require 'Authorization: Bearer K' (default $SMOLEDGE_API_KEY; none = no auth)")
    net.add_argument("--model-name", default=None, help="the model id clients see (default the bundle's source)")
    net.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="also accept requests whose Host header is NAME (repeatable; the bound address, and "
                     "localhost on a loopback bind, are always accepted; '*' = any: no DNS-rebinding guard)")
    net.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                     help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API (repeatable; none by "
                     "default: only the server's own page; '*' = any page)")
    net.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                     help="seconds a client may take to send a request's headers (default 10)")
    net.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                     help="seconds a client may take to send a request's body (default 60)")
    net.add_argument("--idle-timeout", type=float, default=5.0, metavar="S",
                     help="seconds an idle keep-alive connection stays open (default 5)")
    net.add_argument("--max-connections", type=int, default=128, metavar="N",
                     help="open connections; over it the oldest one still sending headers is closed (default 128)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--queue-size", type=int, default=8,
                        help="requests that may wait beyond the one running; more get 429 (default 8)")
    limits.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32)")
    limits.add_argument("--max-image-mb", type=float, default=10.0, help="largest encoded image (default 10)")
    limits.add_argument("--max-image-pixels", type=int, default=32 * MB, help="largest image, width x height")
    limits.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    limits.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (public addresses only, no redirects); off by default")
    limits.add_argument("--allow-private-image-hosts", action="store_true",
                        help="with --allow-remote-images: also fetch from loopback / private addresses")
    limits.add_argument("--remote-image-timeout", type=float, default=10.0, metavar="S",
                        help="seconds one remote image may take to arrive (default 10)")
    limits.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                        help="on SIGINT/SIGTERM, seconds in-flight requests may finish before they are cancelled")
    run = parser.add_argument_group("local engine")
    add_backend_arguments(run)
    run.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    run.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                     help="one line per request on stderr: method, path, status, route, tokens, seconds (never "
                     "the API key, a prompt or an image); --no-access-log turns it off (default on)")
    add_routing_arguments(parser)


def _check_args(args: argparse.Namespace) -> None:
    numbers = {"--queue-size": (args.queue_size, 0), "--max-body-mb": (args.max_body_mb, 1e-9),
               "--max-image-mb": (args.max_image_mb, 1e-9), "--max-image-pixels": (args.max_image_pixels, 1),
               "--max-images": (args.max_images, 0), "--remote-image-timeout": (args.remote_image_timeout, 1e-9),
               "--shutdown-grace": (args.shutdown_grace, 0), "--port": (args.port, 0),
               "--header-timeout": (args.header_timeout, 0.1), "--body-timeout": (args.body_timeout, 0.1),
               "--idle-timeout": (args.idle_timeout, 1), "--max-connections": (args.max_connections, 4),
               "--threads": (args.threads, 0)}
    for flag, (value, low) in numbers.items():
        if not math.isfinite(value) or value < low:
            raise ConfigError(f"{flag} {value} is out of range", hint=f"use a finite value of at least {low:g}")
    if args.port > 65535:
        raise ConfigError(f"--port {args.port} is out of range", hint="use 0-65535")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key is empty", hint="give a key, or leave the flag out for no auth")
    if args.api_key is not None:
        from smoledge.redact import register_secret

        register_secret(args.api_key)


def _web_stack() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"`smoledge serve` needs the web stack, which is not installed ({err.name})",
                          hint=install_hint("serve")) from None


def settings_from_args(args: argparse.Namespace, manifest: Manifest):
    from smoledge.runtime.defaults import SERVER, sampling_defaults
    from smoledge.runtime.server_conn import ConnectionLimits
    from smoledge.runtime.server_guard import AccessRules
    from smoledge.server_app import ServerSettings
    from smoledge.runtime.server_images import ImageLimits

    images = ImageLimits(max_image_bytes=int(args.max_image_mb * MB), max_image_pixels=args.max_image_pixels,
                         max_images=args.max_images, allow_remote=args.allow_remote_images,
                         remote_timeout_s=args.remote_image_timeout,
                         allow_private_hosts=args.allow_private_image_hosts)
    access = AccessRules(bound_host=args.host, allow_hosts=tuple(args.allow_host),
                         allow_origins=tuple(o.rstrip("/") for o in args.allow_origin))
    connections = ConnectionLimits(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                                   idle_timeout_s=args.idle_timeout, max_connections=args.max_connections)
    return ServerSettings(api_key=args.api_key, max_body_bytes=int(args.max_body_mb * MB), images=images,
                          default_max_tokens=manifest.generation.max_new_tokens,
                          sampling=sampling_defaults(manifest.generation, SERVER),
                          shutdown_grace_s=args.shutdown_grace, created=_created(manifest), access=access,
                          connections=connections)


def model_id_for(manifest: Manifest, bundle: str | Path, name: str | None = None) -> str:
    """``--model-name``, else the Hub id the bundle was exported from, else the bundle's folder name."""
    if name:
        return name
    source = manifest.source.model_id
    if source and not Path(source).is_absolute() and not source.startswith("."):
        return source
    return Path(bundle).resolve().name.removesuffix(".zip")


def _created(manifest: Manifest) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(manifest.created).timestamp())
    except (TypeError, ValueError):
        return 0


def bind(host: str, port: int) -> socket.socket:
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        return socket.create_server(address, family=family)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}",
                          hint="pick another --port, or free this one") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    _web_stack()
    from smoledge.cloud_fallback import router_config_from_args
    from smoledge.run import load_pipeline
    from smoledge.server_app import make_server, run_server
    from smoledge.server_worker import Service

    config = router_config_from_args(args)
    pipe = load_pipeline(args.bundle, args, profile=config.profile)
    model_id = model_id_for(pipe.manifest, args.bundle, args.model_name)
    service = Service(pipe, config, queue_size=args.queue_size, model_id=model_id)
    settings = settings_from_args(args, pipe.manifest)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    tiles = config.policy.max_tiles
    print(f"smoledge serve: {model_id} on http://{shown}:{port}/v1 (profile {config.profile.name}, queue "
          f"{args.queue_size}{', API key required' if args.api_key else ''}"
          f"{', never-cloud' if config.policy.never_cloud else ''}"
          f"{f', --max-tiles {tiles}' if tiles is not None else ''})", file=sys.stderr, flush=True)
    if not args.api_key and not is_loopback(args.host):
        print(f"smoledge serve: warning: listening on {args.host} without --api-key: anyone on the network can "
              "use this model (and its cloud fallback)", file=sys.stderr, flush=True)
    run_server(make_server(service, settings, log_level=args.log_level, access_log=args.access_log), sock)
    print("smoledge serve: stopped", file=sys.stderr, flush=True)
    return 0
