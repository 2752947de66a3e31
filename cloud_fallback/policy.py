"""The routing policy: a pure function of (request shape, bundle manifest, device profile, local health).

``decide`` returns a :class:`Decision` - the route (``local``, ``cloud`` or ``refuse``) and a
human-readable reason such as ``"17 tiles > 5 allowed on raspberry-pi-5-4gb"``.  It does no I/O, reads
no clock and keeps no state; the caller passes everything in.

A request is *oversized* for a device when any of these holds (all that hold are named):

* image tiles after splitting > the profile's ``max_image_tiles``
* video frames > the profile's ``max_video_frames``
* prompt + ``max_new_tokens`` > the model's context window or the profile's ``max_context``
* estimated peak memory (weights + KV cache + vision activations + other activations) > the budget
* predicted local latency (from the profile's speed figures) > the caller's deadline
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from smoledge.errors import DeadlineExceededError, SmolEdgeError
from smoledge.runtime.manifest import Manifest
from smoledge.runtime.types import RequestShape

from .config import PolicyConfig
from .profiles import DeviceProfile

Route = Literal["local", "cloud", "refuse"]


@dataclass(frozen=True)
class LocalHealth:
    """How the local engine has been doing, as the caller tracks it (``after`` returns the next state).

    Crashes and missed first-token deadlines are counted apart: a slow, busy device is not a broken one.
    ``probe`` marks the one request that tries local again although the counts say skip (half-open; see
    :class:`~smoledge.cloud_fallback.health.HealthTracker`, which sets it).
    """

    available: bool = True
    consecutive_failures: int = 0
    last_error: str = ""
    deadline_misses: int = 0
    probe: bool = False

    def after(self, error: BaseException | None) -> LocalHealth:
        if error is None:
            return LocalHealth(available=self.available)
        if isinstance(error, DeadlineExceededError):
            return replace(self, deadline_misses=self.deadline_misses + 1, last_error=describe_error(error),
                           probe=False)
        return replace(self, consecutive_failures=self.consecutive_failures + 1, last_error=describe_error(error),
                       probe=False)

    def skips_local(self, policy: PolicyConfig) -> bool:
        """True when the counts say local is failing (and this request is not the half-open probe)."""
        if not self.available:
            return True
        failing = (self.consecutive_failures >= policy.local_failures_before_skip > 0
                   or self.deadline_misses >= policy.local_misses_before_skip > 0)
        return failing and not self.probe


@dataclass(frozen=True)
class Estimate:
    peak_memory_bytes: int
    weight_bytes: int
    kv_cache_bytes: int
    vision_bytes: int
    first_token_s: float
    total_s: float
    context_limit: int


@dataclass(frozen=True)
class Decision:
    route: Route
    code: str  # fits | oversize | local-unhealthy | local-unsupported | local-failed
    reason: str
    fallback_allowed: bool
    estimate: Estimate | None = None


def describe_error(err: BaseException) -> str:
    """One line naming an exception; smoledge errors are already one line that says what went wrong."""
    if isinstance(err, SmolEdgeError):
        return str(err)
    text = " ".join(str(err).split())
    name = type(err).__name__
    return f"{name}: {text}"[:300] if text else name


def decide(
    shape: RequestShape,
    manifest: Manifest,
    profile: DeviceProfile,
    health: LocalHealth,
    policy: PolicyConfig,
) -> Decision:
    est = estimate(shape, manifest, profile)
    if health.skips_local(policy):
        return unavailable_decision(_health_reason(health, policy), policy, est)
    problems = oversize_reasons(shape, manifest, profile, est, policy)
    if problems:
        return _away(problems, "oversize", policy, est)
    reason = (
        f"fits {profile.name}: {shape.image_tiles + shape.video_frames} tiles/frames, "
        f"{_n(shape.prompt_tokens + shape.max_new_tokens)} of {_n(est.context_limit)} tokens, "
        f"peak {_gb(est.peak_memory_bytes)} of {_gb(profile.memory_budget_bytes)}, ~{est.total_s:.1f} s predicted"
    )
    if policy.cloud_off:
        reason += f"; {policy.cloud_off_reason}, so there is no cloud fallback"
    return Decision("local", "fits", reason, fallback_allowed=not policy.cloud_off, estimate=est)


def unavailable_decision(why: str, policy: PolicyConfig, est: Estimate | None = None, *,
                         code: str = "local-unhealthy") -> Decision:
    """The local engine cannot take the request at all (no bundle, repeated failures, unsupported input)."""
    return _away([why], code, policy, est)


def fallback_decision(previous: Decision, error: BaseException, policy: PolicyConfig) -> Decision:
    """The local run failed before its first token; where the request goes now."""
    why = f"local inference failed before the first token: {describe_error(error)}"
    return _away([why], "local-failed", policy, previous.estimate)


def _away(problems: list[str], code: str, policy: PolicyConfig, est: Estimate | None) -> Decision:
    reason = "; ".join(problems)
    if policy.cloud_off:
        return Decision("refuse", code, f"{reason}; {policy.cloud_off_reason}, so it cannot go to the cloud",
                        fallback_allowed=False, estimate=est)
    return Decision("cloud", code, reason, fallback_allowed=False, estimate=est)


def _health_reason(health: LocalHealth, policy: PolicyConfig) -> str:
    if not health.available:
        return f"local engine unavailable: {health.last_error or 'no bundle loaded'}"
    if health.consecutive_failures >= policy.local_failures_before_skip > 0:
        return f"local inference failed {health.consecutive_failures} times in a row (last: {health.last_error})"
    return f"local engine missed the first-token deadline {health.deadline_misses} times in a row"


def estimate(shape: RequestShape, manifest: Manifest, profile: DeviceProfile) -> Estimate:
    mem = manifest.memory
    tokens = shape.prompt_tokens + shape.max_new_tokens
    encodes = shape.image_tiles + shape.video_frames
    kv = mem.kv_bytes_per_token * tokens
    vision = mem.vision_bytes_per_tile * encodes
    peak = mem.weight_bytes + kv + vision + mem.activation_bytes
    speed = profile.speed
    first = encodes * speed.tile_encode_s + _per(shape.prompt_tokens, speed.prefill_tok_s)
    total = first + _per(shape.max_new_tokens, speed.decode_tok_s)
    return Estimate(
        peak_memory_bytes=peak, weight_bytes=mem.weight_bytes, kv_cache_bytes=kv, vision_bytes=vision,
        first_token_s=first, total_s=total, context_limit=min(manifest.context_length, profile.max_context),
    )


def oversize_reasons(
    shape: RequestShape, manifest: Manifest, profile: DeviceProfile, est: Estimate, policy: PolicyConfig
) -> list[str]:
    out = []
    where = f"on {profile.name}"
    if shape.image_tiles > profile.max_image_tiles:
        out.append(f"{shape.image_tiles} tiles > {profile.max_image_tiles} allowed {where}")
    if shape.video_frames > profile.max_video_frames:
        out.append(f"{shape.video_frames} video frames > {profile.max_video_frames} allowed {where}")
    tokens = shape.prompt_tokens + shape.max_new_tokens
    if tokens > est.context_limit:
        owner = "the model's context window" if est.context_limit == manifest.context_length else f"context {where}"
        out.append(f"{_n(shape.prompt_tokens)} prompt + {_n(shape.max_new_tokens)} new tokens = {_n(tokens)} > "
                   f"{_n(est.context_limit)} {owner}")
    if est.peak_memory_bytes > profile.memory_budget_bytes:
        out.append(f"estimated peak memory {_gb(est.peak_memory_bytes)} > {_gb(profile.memory_budget_bytes)} budget "
                   f"{where} (weights {_gb(est.weight_bytes)} + KV cache {_gb(est.kv_cache_bytes)} + "
                   f"vision {_gb(est.vision_bytes)})")
    out.extend(_deadline_reasons(est, policy, where))
    return out


def _deadline_reasons(est: Estimate, policy: PolicyConfig, where: str) -> list[str]:
    out = []
    if policy.first_token_deadline_s is not None and est.first_token_s > policy.first_token_deadline_s:
        out.append(f"predicted first token after {est.first_token_s:.1f} s {where} > "
                   f"{policy.first_token_deadline_s:g} s first-token deadline")
    if policy.deadline_s is not None and est.total_s > policy.deadline_s:
        out.append(f"predicted {est.total_s:.1f} s locally {where} > {policy.deadline_s:g} s deadline")
    return out


def _per(amount: int, rate: float) -> float:
    if amount <= 0:
        return 0.0
    return amount / rate if rate > 0 else float("inf")


def _n(value: int) -> str:
    return f"{value:,}"


def _gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB"
