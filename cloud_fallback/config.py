"""Frozen configs of the router, one per component, and how they are built from flags + environment.

``add_routing_arguments(parser)`` adds ``--profile``, ``--no-cloud``, ``--deadline``, ``--max-tiles`` and ``--project``;
``router_config_from_args(args)`` turns the parsed flags and the environment into a
:class:`RouterConfig`.  Environment variables (flags win over them):

=========================  ============================================================================
``SMOLEDGE_PROFILE``       device profile name (default ``auto``)
``SMOLEDGE_NO_CLOUD``      ``1`` turns on never-cloud: no request ever leaves the device
``SMOLEDGE_PROJECT``       project tag written into the usage ledger (default ``default``)
``SMOLEDGE_MAX_TILES``     ``auto`` or N: answer photos locally with fewer tiles instead of the cloud
``SMOLEDGE_CLOUD_BASE_URL`` the router's OpenAI-compatible base URL (default the public HF router)
``SMOLEDGE_CLOUD_MODELS``  comma-separated ``model[:fastest|:cheapest|:provider]`` list: the substitute
                           first, then the alternatives; overrides the bundle's manifest
``SMOLEDGE_BILL_TO``       Hugging Face organisation billed for cloud calls
``SMOLEDGE_CACHE_DIR``     folder for the ledger and calibrations (default the user cache dir)
``SMOLEDGE_CLOUD_BUDGET_S`` seconds the cloud path may take per request without ``--deadline`` (default 120)
``SMOLEDGE_SPEND_CAP_USD`` per-project cloud spend cap in dollars (default none)
``SMOLEDGE_SPEND_CAP_PERIOD`` ``day`` (default) or ``month`` (UTC) for the cap
``SMOLEDGE_UPLOAD_MAX_PIXELS`` pixels of an uploaded image or video frame (default 1572864, 1536 x 1024)
``SMOLEDGE_UPLOAD_MAX_BYTES`` bytes of an uploaded image (default 1000000)
``SMOLEDGE_UPLOAD_VIDEO_MAX_BYTES`` bytes of an uploaded video (default 8000000)
``HF_TOKEN``               the token (or the ``hf auth login`` token); never written anywhere
``HF_HUB_OFFLINE``         ``1``: no network, so never-cloud (as for every Hugging Face tool)
=========================  ============================================================================
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from smoledge.errors import ConfigError
from smoledge.runtime.cache import cache_path

from .profiles import DeviceProfile, load_profile

DEFAULT_BASE_URL = "https://router.huggingface.co/v1"
# No provider serves SmolVLM itself; these VLMs are served by Inference Providers.
DEFAULT_MODELS = (
    "Qwen/Qwen2.5-VL-7B-Instruct:fastest",
    "Qwen/Qwen2.5-VL-32B-Instruct:fastest",
    "google/gemma-3-27b-it:fastest",
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class RetryConfig:
    """Per cloud model: how often to try, and the exponential backoff between tries."""

    attempts: int = 3  # tries per model, at least 1 (0 is refused, not read as 1)
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    jitter: float = 0.5  # the delay is scaled by a random factor in [1 - jitter, 1]
    max_retry_after_s: float = 30.0  # a longer Retry-After moves on to the next model instead

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(f"RetryConfig.attempts={self.attempts!r} must be a whole number >= 1",
                              hint="1 means one try per model and no retry")


@dataclass(frozen=True)
class CooldownConfig:
    """After ``failures`` failed calls in a row a model is skipped for ``seconds``."""

    failures: int = 2
    seconds: float = 60.0


@dataclass(frozen=True)
class UploadConfig:
    """How images and videos are prepared for upload: an image over ``max_pixels`` or ``max_bytes`` (or in a
    format the router may not take) is downscaled and re-encoded as JPEG; a video with frames over
    ``max_pixels`` or a file over ``video_max_bytes`` is re-encoded (PyAV) to MP4 with frames within
    ``max_pixels``, at most ``video_fps`` frames a second and ``video_max_frames`` in all (what the local
    video path samples).  Smaller ones go as they are."""

    max_pixels: int = 1_572_864  # 1536 x 1024: what the substitute VLMs use; more only costs upload and tokens
    max_bytes: int = 1_000_000
    jpeg_quality: int = 85
    video_max_bytes: int = 8_000_000
    video_fps: float = 1.0  # SmolVLM2's video sampling (runtime.video.DEFAULT_FPS / DEFAULT_MAX_FRAMES)
    video_max_frames: int = 64
    video_crf: int = 28  # H.264 quality of a re-encoded video (lower is better and bigger)

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_bytes", "jpeg_quality", "video_max_bytes", "video_max_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"UploadConfig.{name}={value!r} must be a whole number >= 1",
                                  hint="e.g. SMOLEDGE_UPLOAD_MAX_PIXELS=1572864")
        if not self.video_fps > 0:
            raise ConfigError(f"UploadConfig.video_fps={self.video_fps!r} must be a positive number", hint="e.g. 1")


@dataclass(frozen=True)
class CloudConfig:
    base_url: str = DEFAULT_BASE_URL
    models: tuple[str, ...] = ()  # empty: the bundle manifest's choice, else DEFAULT_MODELS
    bill_to: str | None = None
    token: str | None = field(default=None, repr=False)  # None: HF_TOKEN or the huggingface_hub login
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0  # longest silence between two bytes of an answer
    total_timeout_s: float = 300.0  # one call, first byte to last
    budget_s: float = 120.0  # the whole cloud path of one request: attempts, targets, Retry-After sleeps
    pricing_timeout_s: float = 3.0
    models_ttl_s: float = 3600.0  # how long the /models listing (prices, context windows) is reused
    retry: RetryConfig = field(default_factory=RetryConfig)
    cooldown: CooldownConfig = field(default_factory=CooldownConfig)
    uploads: UploadConfig = field(default_factory=UploadConfig)

    def __post_init__(self) -> None:
        if not self.budget_s > 0:
            raise ConfigError(f"CloudConfig.budget_s={self.budget_s!r} must be a positive number of seconds",
                              hint="e.g. 120; set SMOLEDGE_NO_CLOUD=1 to turn the cloud off instead")


@dataclass(frozen=True)
class PolicyConfig:
    never_cloud: bool = False
    offline: bool = False  # HF_HUB_OFFLINE is set: never-cloud, with that reason
    deadline_s: float | None = None  # total time the caller grants one answer, local and cloud together
    first_token_deadline_s: float | None = None
    local_failures_before_skip: int = 3  # after this many local failures in a row, go straight to the cloud
    local_misses_before_skip: int = 3  # ... or this many missed first-token deadlines in a row
    local_retry_after_s: float = 30.0  # then, after this cool-off, one request tries local again
    local_retry_every: int = 10  # ... or every Nth request sent away meanwhile (0: only the cool-off)
    # photos with fewer tiles instead of the cloud: None = never, "auto" = when the tiles or the memory do
    # not fit the device, N = also at most N tiles per request (cloud_fallback/tile_budget.py)
    max_tiles: int | str | None = None

    @property
    def cloud_off(self) -> bool:
        return self.never_cloud or self.offline

    @property
    def cloud_off_reason(self) -> str:
        return "HF_HUB_OFFLINE is set" if self.offline and not self.never_cloud else "never-cloud is on"


@dataclass(frozen=True)
class LedgerConfig:
    path: Path
    project: str = "default"
    enabled: bool = True
    spend_cap_usd: float | None = None  # per project and period; None: no cap
    spend_cap_period: str = "day"  # "day" or "month", UTC
    lock_timeout_s: float = 5.0  # how long a write waits for another writer before it is skipped

    def __post_init__(self) -> None:
        if self.spend_cap_period not in ("day", "month"):
            raise ConfigError(f"spend cap period {self.spend_cap_period!r} is not 'day' or 'month'",
                              hint="set SMOLEDGE_SPEND_CAP_PERIOD=day or =month")
        if self.spend_cap_usd is not None and not self.spend_cap_usd >= 0:
            raise ConfigError(f"spend cap {self.spend_cap_usd!r} USD is not a number >= 0",
                              hint="e.g. SMOLEDGE_SPEND_CAP_USD=5")


@dataclass(frozen=True)
class RouterConfig:
    profile: DeviceProfile
    policy: PolicyConfig
    cloud: CloudConfig
    ledger: LedgerConfig
    cache_dir: Path


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("SMOLEDGE_CACHE_DIR"):
        return Path(env["SMOLEDGE_CACHE_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("smoledge"))


def ledger_path(cache_dir: Path) -> Path:
    return cache_path("cloud_ledger.sqlite", cache_dir)


def listing_path(cache_dir: Path) -> Path:
    """The cloud router's /models listing kept between processes (prices, context windows)."""
    return cache_path("cloud_models.json", cache_dir)


def env_flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={env[name]!r} is not a yes/no value", hint=f"set {name}=1 or {name}=0")


def parse_models(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    for model in models:
        if "/" not in model.split(":", 1)[0]:
            raise ConfigError(f"cloud model {model!r} is not a Hub model id",
                              hint="write it as org/name, optionally with :fastest, :cheapest or :provider")
    return models


def add_routing_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("routing between device and cloud")
    group.add_argument("--profile", default=None, metavar="P",
                       help="device profile (default $SMOLEDGE_PROFILE or 'auto'); see `smoledge doctor --list`")
    group.add_argument("--no-cloud", action="store_true", default=False,
                       help="never send anything to the cloud (also SMOLEDGE_NO_CLOUD=1)")
    group.add_argument("--deadline", type=float, default=None, metavar="S",
                       help="seconds the answer may take, local and cloud together: local is tried first unless "
                       "this device's calibration predicts it clearly slower; a failed cloud call falls back to "
                       "local while time is left")
    group.add_argument("--max-tiles", default=None, metavar="N|auto",
                       help="answer a photo locally with fewer tiles instead of the cloud: 'auto' when it does not "
                       "fit the device, N = at most N tiles (default $SMOLEDGE_MAX_TILES, else off)")
    group.add_argument("--project", default=None, metavar="TAG",
                       help="project tag for the cloud usage ledger (default $SMOLEDGE_PROJECT or 'default')")


def router_config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> RouterConfig:
    """Flags first, then the environment, then the defaults."""
    return router_config(profile=getattr(args, "profile", None), no_cloud=bool(getattr(args, "no_cloud", False)),
                         deadline=getattr(args, "deadline", None), project=getattr(args, "project", None),
                         max_tiles=getattr(args, "max_tiles", None), env=env)


def router_config(*, profile: str | None = None, no_cloud: bool = False, deadline: float | None = None,
                  project: str | None = None, max_tiles: int | str | None = None,
                  env: Mapping[str, str] | None = None) -> RouterConfig:
    """The routing config from Python, without argparse: the arguments are the CLI's ``--profile``,
    ``--no-cloud``, ``--deadline``, ``--project`` and ``--max-tiles``; what they leave unset comes from the environment
    (``SMOLEDGE_PROFILE``, ``SMOLEDGE_NO_CLOUD``, ``SMOLEDGE_CLOUD_*``, ...; ``env`` replaces ``os.environ``),
    then the defaults.  ``router_config(no_cloud=True)`` never sends anything away."""
    env = os.environ if env is None else env
    cache_dir = default_cache_dir(env)
    profile_name = profile or env.get("SMOLEDGE_PROFILE") or "auto"
    if deadline is not None and deadline <= 0:
        raise ConfigError(f"--deadline {deadline} is not a positive number of seconds", hint="e.g. --deadline 10")
    policy = PolicyConfig(
        never_cloud=no_cloud or env_flag(env, "SMOLEDGE_NO_CLOUD"),
        offline=hub_offline(env),
        deadline_s=deadline,
        max_tiles=parse_max_tiles(max_tiles or env.get("SMOLEDGE_MAX_TILES")),
    )
    cloud = CloudConfig(
        base_url=env.get("SMOLEDGE_CLOUD_BASE_URL") or DEFAULT_BASE_URL,
        models=parse_models(env.get("SMOLEDGE_CLOUD_MODELS", "")),
        bill_to=env.get("SMOLEDGE_BILL_TO") or None,
        budget_s=_env_number(env, "SMOLEDGE_CLOUD_BUDGET_S", CloudConfig.budget_s, minimum=0.001),
        uploads=upload_config_from_env(env),
    )
    project = project or env.get("SMOLEDGE_PROJECT") or "default"
    return RouterConfig(profile=load_profile(profile_name, cache_dir=cache_dir), policy=policy, cloud=cloud,
                        ledger=ledger_config_from_env(env, cache_dir, project), cache_dir=cache_dir)


def parse_max_tiles(text: str | None) -> int | str | None:
    """``--max-tiles`` / ``SMOLEDGE_MAX_TILES``: None (off), ``"auto"`` or a whole number >= 1."""
    if text is None or not str(text).strip():
        return None
    value = str(text).strip().lower()
    if value == "auto":
        return "auto"
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"--max-tiles {text!r} is not 'auto' or a whole number >= 1", hint="e.g. --max-tiles auto")
    return int(value)


def ledger_config_from_env(env: Mapping[str, str], cache_dir: Path, project: str = "default") -> LedgerConfig:
    """The ledger in ``cache_dir``, with the spend cap of ``SMOLEDGE_SPEND_CAP_USD`` / ``_PERIOD``."""
    cap = env.get("SMOLEDGE_SPEND_CAP_USD", "").strip()
    return LedgerConfig(path=ledger_path(cache_dir), project=project,
                        spend_cap_usd=_env_number(env, "SMOLEDGE_SPEND_CAP_USD", 0.0) if cap else None,
                        spend_cap_period=env.get("SMOLEDGE_SPEND_CAP_PERIOD", "").strip().lower() or "day")


def upload_config_from_env(env: Mapping[str, str]) -> UploadConfig:
    """``SMOLEDGE_UPLOAD_MAX_PIXELS`` / ``_MAX_BYTES`` / ``_VIDEO_MAX_BYTES`` over the defaults."""
    d = UploadConfig()
    return UploadConfig(
        max_pixels=int(_env_number(env, "SMOLEDGE_UPLOAD_MAX_PIXELS", d.max_pixels, minimum=1)),
        max_bytes=int(_env_number(env, "SMOLEDGE_UPLOAD_MAX_BYTES", d.max_bytes, minimum=1)),
        video_max_bytes=int(_env_number(env, "SMOLEDGE_UPLOAD_VIDEO_MAX_BYTES", d.video_max_bytes, minimum=1)),
    )


def hub_offline(env: Mapping[str, str] | None = None) -> bool:
    """Offline mode as huggingface_hub defines it (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to
    1/true/yes/on), read from the environment at call time (huggingface_hub reads it once, at import)."""
    env = os.environ if env is None else env
    value = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _env_number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= minimum or value == float("inf"):
        raise ConfigError(f"{name}={text!r} is not a number >= {minimum:g}", hint=f"e.g. {name}=5")
    return value
