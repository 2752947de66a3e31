"""The routing policy: a pure function of (request shape, bundle manifest, device profile, local health).

``decide`` returns a :class:`Decision` - the route (``local``, ``cloud`` or ``refuse``) and a
human-readable reason such as ``"17 tiles > 5 allowed on raspberry-pi-5-4gb"``.  It does no I/O, reads
no clock and keeps no state; the caller passes everything in.

A request is *oversized* for a device when any of these holds (all that hold are named):

* image tiles after splitting > the profile's ``max_image_tiles``
* video frames > the profile's ``max_video_frames``
* prompt + ``max_new_tokens`` > the model's context window or the profile's ``max_context``
* estimated peak memory > the budget: from this device's calibration of the bundle (``smoledge doctor
  --calibrate``), else the figures export measured (``manifest.memory.measured``), else the formula
  (weights + KV cache + vision activations + other activations)
* predicted local latency > the caller's deadline, where the prediction is calibrated on this device and
  clearly over (by more than ``DEADLINE_MARGIN``); an uncalibrated or marginal prediction tries local first
  and leaves the run-time deadline to hand the request on (see docs/memory.md)
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
    fixed_bytes: int = 0  # measured: the loaded runtime with its weights; formula: the weights
    memory_source: str = "formula"  # "calibrated", "measured at export" or "formula"
    speed_source: str = "profile"  # the profile's SpeedFigures.source

    @property
    def calibrated(self) -> bool:
        """Whether the time prediction was measured on this device (a profile's or estimated speed is not)."""
        return self.speed_source.startswith("calibrated")


@dataclass(frozen=True)
class Decision:
    route: Route
    code: str  # fits | oversize | deadline | local-unhealthy | local-unsupported | local-failed | fewer-tiles | ...
    reason: str
    fallback_allowed: bool
    estimate: Estimate | None = None
    kinds: tuple[str, ...] = ()  # what did not fit: tiles | frames | context | memory | deadline


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
    backend: str | None = None,
) -> Decision:
    est = estimate(shape, manifest, profile, backend)
    if health.skips_local(policy):
        return unavailable_decision(_health_reason(health, policy), policy, est)
    problems = problem_list(shape, manifest, profile, est, policy)
    hard = [(kind, text) for kind, text in problems if kind != "deadline"]
    if hard or (problems and est.calibrated and _clearly_over(est, policy)):
        code = "oversize" if hard else "deadline"
        return _away([text for _, text in problems], code, policy, est, kinds=tuple(k for k, _ in problems))
    reason = (
        f"fits {profile.name}: {shape.image_tiles + shape.video_frames} tiles/frames, "
        f"{_n(shape.prompt_tokens + shape.max_new_tokens)} of {_n(est.context_limit)} tokens, "
        f"peak {_gb(est.peak_memory_bytes)} of {_gb(profile.memory_budget_bytes)}, ~{est.total_s:.1f} s predicted"
    )
    if problems:  # over the deadline by a prediction that is not measured here, or by too little to trust
        why = "not calibrated on this device" if not est.calibrated else "within the prediction's margin"
        reason += f"; {'; '.join(t for _, t in problems)}, but the prediction is {why}, so local is tried first"
    if policy.cloud_off:
        reason += f"; {policy.cloud_off_reason}, so there is no cloud fallback"
    return Decision("local", "fits", reason, fallback_allowed=not policy.cloud_off, estimate=est)


# A calibrated time prediction is trusted to this factor: a request predicted at most this much over its
# deadline is tried locally (the run-time deadline still hands it to the cloud if no token comes in time).
DEADLINE_MARGIN = 1.5


def _clearly_over(est: Estimate, policy: PolicyConfig) -> bool:
    over = []
    if policy.deadline_s is not None:
        over.append(est.total_s > DEADLINE_MARGIN * policy.deadline_s)
    if policy.first_token_deadline_s is not None:
        over.append(est.first_token_s > DEADLINE_MARGIN * policy.first_token_deadline_s)
    return any(over)


def unavailable_decision(why: str, policy: PolicyConfig, est: Estimate | None = None, *,
                         code: str = "local-unhealthy") -> Decision:
    """The local engine cannot take the request at all (no bundle, repeated failures, unsupported input)."""
    return _away([why], code, policy, est)


def fallback_decision(previous: Decision, error: BaseException, policy: PolicyConfig) -> Decision:
    """The local run failed before its first token; where the request goes now."""
    why = f"local inference failed before the first token: {describe_error(error)}"
    return _away([why], "local-failed", policy, previous.estimate)


def _away(problems: list[str], code: str, policy: PolicyConfig, est: Estimate | None,
          kinds: tuple[str, ...] = ()) -> Decision:
    reason = "; ".join(problems)
    if policy.cloud_off:
        return Decision("refuse", code, f"{reason}; {policy.cloud_off_reason}, so it cannot go to the cloud",
                        fallback_allowed=False, estimate=est, kinds=kinds)
    return Decision("cloud", code, reason, fallback_allowed=False, estimate=est, kinds=kinds)


def _health_reason(health: LocalHealth, policy: PolicyConfig) -> str:
    if not health.available:
        return f"local engine unavailable: {health.last_error or 'no bundle loaded'}"
    if health.consecutive_failures >= policy.local_failures_before_skip > 0:
        return f"local inference failed {health.consecutive_failures} times in a row (last: {health.last_error})"
    return f"local engine missed the first-token deadline {health.deadline_misses} times in a row"


def estimate(shape: RequestShape, manifest: Manifest, profile: DeviceProfile, backend: str | None = None) -> Estimate:
    """Peak memory and time of ``shape`` on ``profile``: memory from this device's calibration of the bundle,
    else the figures measured at export (for ``backend``'s format), else the manifest's formula."""
    tokens = shape.prompt_tokens + shape.max_new_tokens
    encodes = shape.image_tiles + shape.video_frames
    measured, source = memory_figures(manifest, profile, backend)
    mem = manifest.memory
    if measured is not None:
        fixed = measured.fixed_bytes
        peak = measured.peak_bytes(shape.prompt_tokens, shape.max_new_tokens, encodes)
        vision = measured.peak_bytes(0, 0, encodes) - fixed
        kv = peak - fixed - vision
    else:
        fixed, kv, vision = mem.weight_bytes, mem.kv_bytes_per_token * tokens, mem.vision_bytes_per_tile * encodes
        peak = mem.weight_bytes + kv + vision + mem.activation_bytes
    speed = profile.speed
    first = encodes * speed.tile_encode_s + _per(shape.prompt_tokens, speed.prefill_tok_s)
    total = first + _per(shape.max_new_tokens, speed.decode_tok_s)
    return Estimate(
        peak_memory_bytes=peak, weight_bytes=mem.weight_bytes, kv_cache_bytes=kv, vision_bytes=vision,
        fixed_bytes=fixed,
        first_token_s=first, total_s=total, context_limit=min(manifest.context_length, profile.max_context),
        memory_source=source, speed_source=speed.source,
    )


def memory_figures(manifest: Manifest, profile: DeviceProfile, backend: str | None = None):
    """(the measured figures to use, where they come from): ``calibrated``, ``measured at export`` or
    (None, ``formula``)."""
    if profile.memory is not None:
        return profile.memory, "calibrated"
    measured = manifest.memory.measured
    fmt = backend if backend in measured else "onnx" if "onnx" in measured else next(iter(sorted(measured)), None)
    if fmt is None:
        return None, "formula"
    return measured[fmt], "measured at export"


def oversize_reasons(
    shape: RequestShape, manifest: Manifest, profile: DeviceProfile, est: Estimate, policy: PolicyConfig
) -> list[str]:
    return [text for _, text in problem_list(shape, manifest, profile, est, policy)]


def problem_list(
    shape: RequestShape, manifest: Manifest, profile: DeviceProfile, est: Estimate, policy: PolicyConfig
) -> list[tuple[str, str]]:
    """Why the request does not fit: (kind, reason) with kind tiles | frames | context | memory | deadline."""
    out = []
    where = f"on {profile.name}"
    if shape.image_tiles > profile.max_image_tiles:
        out.append(("tiles", f"{shape.image_tiles} tiles > {profile.max_image_tiles} allowed {where}"))
    if shape.video_frames > profile.max_video_frames:
        out.append(("frames", f"{shape.video_frames} video frames > {profile.max_video_frames} allowed {where}"))
    tokens = shape.prompt_tokens + shape.max_new_tokens
    if tokens > est.context_limit:
        owner = "the model's context window" if est.context_limit == manifest.context_length else f"context {where}"
        out.append(("context", f"{_n(shape.prompt_tokens)} prompt + {_n(shape.max_new_tokens)} new tokens = "
                    f"{_n(tokens)} > {_n(est.context_limit)} {owner}"))
    if est.peak_memory_bytes > profile.memory_budget_bytes:
        out.append(("memory", _memory_reason(est, profile, where)))
    out.extend(("deadline", text) for text in _deadline_reasons(est, policy, where))
    return out


def _memory_reason(est: Estimate, profile: DeviceProfile, where: str) -> str:
    head = f"estimated peak memory {_gb(est.peak_memory_bytes)} > {_gb(profile.memory_budget_bytes)} budget {where}"
    if est.memory_source == "formula":
        return (f"{head} (weights {_gb(est.weight_bytes)} + KV cache {_gb(est.kv_cache_bytes)} + "
                f"vision {_gb(est.vision_bytes)})")
    return (f"{head} (loaded runtime {_gb(est.fixed_bytes)} + prompt and KV cache {_gb(est.kv_cache_bytes)} + "
            f"vision {_gb(est.vision_bytes)}; {est.memory_source})")


_FIXES = {
    "tiles": "use fewer or smaller images, or --max-tiles auto to answer locally with fewer tiles",
    "frames": "--max-frames auto samples a video down to the device's frame limit",
    "context": "shorten the prompt or lower --max-new-tokens",
    "memory": "--max-tiles auto answers a photo with fewer tiles; or use a smaller image or a shorter prompt",
    "deadline": "raise --deadline, or calibrate this device (smoledge doctor --bundle B --calibrate)",
}


def refusal_hint(decision: Decision, policy: PolicyConfig) -> str:
    """What fixes a refused request: the flags for each problem, then how to allow the cloud."""
    fixes = [_FIXES[kind] for kind in dict.fromkeys(decision.kinds) if kind in _FIXES]
    allow = ("unset HF_HUB_OFFLINE to allow the cloud" if policy.offline and not policy.never_cloud
             else "or allow the cloud fallback (drop --no-cloud / SMOLEDGE_NO_CLOUD=1)")
    return "; ".join(fixes + [allow]) if fixes else f"shrink the request, {allow}"


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
