"""The one entry point the CLI and the server call: ``answer(request, engine, config=...)``.

It measures the request, decides by policy, runs locally or in the cloud, falls back to the cloud when
the local run fails before its first token, streams, and records every cloud call in the ledger::

    result = answer(request, engine, config=router_config_from_args(args))
    print(result.decision.reason, file=sys.stderr)      # known before the first chunk
    for chunk in result:
        print(chunk.text, end="", flush=True)

``result.decision`` is the route in force; it changes (and ``on_decision`` is called) when a local
failure hands the request to the cloud, always before the first cloud chunk.  ``result.engine`` is the
local engine that answers: after a tile reduction (``--max-tiles``), a view with fewer tiles, whose
``last_stats`` are that run's.  ``answer_text`` is the non-streaming form.  Errors: CloudDisabledError when
the request needs the cloud and never-cloud is on (raised by ``answer`` itself); FallbackFailedError when
local failed and the cloud failed too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from smoledge.errors import (
    BackendError,
    CloudCreditError,
    CloudDisabledError,
    CloudError,
    DeadlineExceededError,
    FallbackFailedError,
    InputError,
    PromptTooLongError,
    SmolEdgeError,
    VideoDecoderMissingError,
    classify,
)
from smoledge.runtime.request_check import check_request
from smoledge.runtime.types import ChatRequest, StreamChunk

from .cloud import CloudFallback, cloud_targets
from .config import PolicyConfig, RouterConfig, hub_offline
from .engine import LocalEngine
from .local_run import LocalRun, LocalTimeout
from .policy import (
    Decision,
    LocalHealth,
    decide,
    describe_error,
    fallback_decision,
    refusal_hint,
    unavailable_decision,
)
from .profiles import calibrated_profile, engine_format
from .tile_budget import plan_fewer_tiles


class _EarlyFailure(Exception):
    """The local run failed before its first chunk reached the caller (so the cloud may take over)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Reply:
    text: str
    decision: Decision
    decisions: tuple[Decision, ...]
    finish_reason: str | None


def answer(
    request: ChatRequest,
    engine: LocalEngine | None,
    *,
    config: RouterConfig,
    health: LocalHealth | None = None,
    cloud: CloudFallback | None = None,
    on_decision: Callable[[Decision], None] | None = None,
) -> Answer:
    """Route ``request`` and return its answer as a stream of chunks (see the module docstring)."""
    return Answer(request, engine, config=config, health=health or LocalHealth(), cloud=cloud,
                  on_decision=on_decision)


def format_decision(decision: Decision) -> str:
    """One line for a CLI's stderr, e.g. ``[route: cloud - 17 tiles > 5 allowed on raspberry-pi-5-4gb]``."""
    return f"[route: {decision.route} - {decision.reason}]"


def answer_text(request: ChatRequest, engine: LocalEngine | None, *, config: RouterConfig, **kwargs) -> Reply:
    result = answer(request, engine, config=config, **kwargs)
    parts, finish = [], None
    for chunk in result:
        parts.append(chunk.text)
        finish = chunk.finish_reason or finish
    return Reply("".join(parts), result.decision, tuple(result.decisions), finish)


class Answer(Iterator[StreamChunk]):
    def __init__(self, request: ChatRequest, engine: LocalEngine | None, *, config: RouterConfig,
                 health: LocalHealth, cloud: CloudFallback | None, on_decision: Callable[[Decision], None] | None):
        self.request, self.engine, self.config = check_request(request), engine, config  # bad input stops here
        self.policy: PolicyConfig = replace(config.policy, offline=True) if hub_offline() else config.policy
        self.started = time.monotonic()  # --deadline counts from here, for local and cloud together
        self.shape = None
        self.health = health  # what this request was routed with (``health.probe``: the half-open try)
        self.decisions: list[Decision] = []
        self.local_tried = False
        self.local_error: BaseException | None = None
        self._cloud, self._on_decision = cloud, on_decision
        self._cloud_passed = 0
        self.profile = config.profile  # with this bundle's calibration on this device, once measured
        self._set(self._plan(health))
        if self.decision.route == "refuse":
            raise CloudDisabledError(self.decision.reason, hint=refusal_hint(self.decision, self.policy))
        self._chunks = self._run()

    @property
    def decision(self) -> Decision:
        return self.decisions[-1]

    def __next__(self) -> StreamChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def next_health(self, health: LocalHealth) -> LocalHealth:
        """The local health to pass to the next request (unchanged when the local engine was not run)."""
        return health.after(self.local_error) if self.local_tried else health

    def _set(self, decision: Decision) -> None:
        self.decisions.append(decision)
        if self._on_decision is not None:
            self._on_decision(decision)

    def _plan(self, health: LocalHealth) -> Decision:
        policy = self.policy
        if self.engine is None:
            return unavailable_decision("no local bundle loaded", policy)
        try:
            shape = self.engine.measure(self.request)
        except VideoDecoderMissingError:  # a package to install: never worked around by uploading the video
            raise
        except PromptTooLongError as err:  # the cloud may take what this runtime cannot
            return unavailable_decision(f"the local runtime cannot take this request: {describe_error(err)}",
                                        policy, code="local-unsupported")
        except InputError:  # a bad image or an empty request: the cloud could not answer it either
            raise
        except Exception as err:
            self.local_error = err
            return unavailable_decision(f"local engine could not measure the request: {describe_error(err)}", policy)
        self.shape = shape
        self.profile = calibrated_profile(self.config.profile, self.engine, self.config.cache_dir)
        decision = self._decide(shape, health)
        fewer = plan_fewer_tiles(self, shape, decision, health) if self.request.images() else None
        if fewer is not None:
            self.engine, self.shape, decision = fewer
        return decision

    def _decide(self, shape, health: LocalHealth, *, engine: LocalEngine | None = None) -> Decision:
        engine = engine or self.engine
        return decide(shape, engine.manifest, self.profile, health, self.policy, engine_format(engine))

    def _run(self) -> Iterator[StreamChunk]:
        local_error = self.local_error
        if self.decision.route == "local":
            try:
                yield from self._local()
                return
            except _EarlyFailure as early:
                local_error = self.local_error = early.error
            if not self.decision.fallback_allowed:
                raise _rewrite(local_error, f"{self.policy.cloud_off_reason}, so there is no cloud fallback") \
                    from local_error
            self._set(fallback_decision(self.decision, local_error, self.policy))
        try:
            yield from self._cloud_stream(local_error)
        except CloudError as err:
            local = None if self._cloud_passed else self._local_instead(err)
            if local is None:
                raise
            self._set(local)
            try:
                yield from self._local()
            except _EarlyFailure as early:
                self.local_error = early.error
                if local.code == "spend-cap":
                    raise _rewrite(early.error, "the cloud spend cap is reached, so there is no cloud fallback") \
                        from early.error
                raise FallbackFailedError(early.error, err) from early.error

    def _local_instead(self, err: CloudError) -> Decision | None:
        """A request the cloud could not take runs locally where it can: over the spend cap when it was sent away
        only because local looked unhealthy; with --deadline, after any cloud failure (see below)."""
        if self.local_tried or self.engine is None or self.shape is None:
            return None
        if isinstance(err, CloudCreditError) and getattr(err, "status", "") == "spend_cap":
            fits = self._decide(self.shape, LocalHealth())
            if fits.route != "local":
                return None
            cap = err.__cause__ if isinstance(err.__cause__, CloudCreditError) else err  # without the routing note
            return Decision("local", "spend-cap", f"{cap.message}; answered locally instead ({fits.reason})",
                            fallback_allowed=False, estimate=fits.estimate)
        return self._local_before_deadline(err)

    def _local_before_deadline(self, err: CloudError) -> Decision | None:
        """With --deadline, a request sent away for a predicted miss or an unhealthy local engine runs locally
        after the cloud failed, when it fits here and its prediction (if calibrated) makes what is left."""
        if self.decisions[0].code not in ("deadline", "local-unhealthy") or self.policy.deadline_s is None:
            return None
        left = self.started + self.policy.deadline_s - time.monotonic()
        relaxed = replace(self.policy, deadline_s=None, first_token_deadline_s=None)
        fits = decide(self.shape, self.engine.manifest, self.profile, LocalHealth(), relaxed,
                      engine_format(self.engine))
        est = fits.estimate
        if fits.route != "local" or left <= 0 or (est is not None and est.calibrated and est.total_s > left):
            return None
        cause = err.__cause__ if isinstance(err.__cause__, CloudError) else err
        return Decision("local", "cloud-failed", f"the cloud failed ({describe_error(cause)}); answered locally "
                        f"within the {left:.1f} s left of the {self.policy.deadline_s:g} s deadline",
                        fallback_allowed=False, estimate=est)

    def _local(self) -> Iterator[StreamChunk]:
        assert self.engine is not None
        self.local_tried = True
        run, start, passed = LocalRun(self.engine, self.request), time.monotonic(), 0
        try:
            while True:
                try:
                    chunk = run.next(self._wait(start, passed))
                except LocalTimeout:
                    err = self._deadline_error(passed)
                    if passed:
                        self.local_error = err
                        raise err from None
                    raise _EarlyFailure(err) from None
                except Exception as err:  # MemoryError, BackendError, anything the engine raises
                    if classify(err) == "input":  # the request's fault: not the engine's, not for the cloud
                        self.local_tried = False
                        raise
                    if passed:
                        self.local_error = err
                        raise _rewrite(err, f"after {passed} chunks had been streamed; not handed to the "
                                            "cloud, to avoid a duplicated answer") from err
                    raise _EarlyFailure(err) from err
                if chunk is None:
                    return
                if chunk.text or chunk.finish_reason is not None:
                    passed += 1
                    yield chunk
        finally:
            run.cancel()

    def _wait(self, start: float, passed: int) -> float | None:
        policy = self.policy
        ends = [self.started + policy.deadline_s] if policy.deadline_s is not None else []
        if not passed and policy.first_token_deadline_s is not None:
            ends.append(start + policy.first_token_deadline_s)
        return min(ends) - time.monotonic() if ends else None

    def _deadline_error(self, passed: int) -> DeadlineExceededError:
        policy = self.policy
        if not passed:
            limit = min(x for x in (policy.deadline_s, policy.first_token_deadline_s) if x is not None)
            return DeadlineExceededError(f"no first token from the local engine within {limit:g} s",
                                         hint="raise --deadline, or use a faster device profile")
        return DeadlineExceededError(
            f"the local answer passed the {policy.deadline_s:g} s deadline after {passed} chunks had been "
            "streamed; not handed to the cloud, to avoid a duplicated answer", hint="raise --deadline")

    def _cloud_stream(self, local_error: BaseException | None) -> Iterator[StreamChunk]:
        owned = self._cloud is None
        fallback = self._cloud or CloudFallback.from_config(self.config)
        targets = cloud_targets(self.config.cloud, self.engine.manifest if self.engine is not None else None)
        deadline = self.started + self.policy.deadline_s if self.policy.deadline_s is not None else None
        needed = self.shape.prompt_tokens + self.shape.max_new_tokens if self.shape is not None else None
        self._cloud_passed = 0
        try:
            for chunk in fallback.stream(self.request, targets, self.decision, deadline=deadline,
                                         needed_tokens=needed):
                self._cloud_passed += 1
                yield chunk
        except CloudError as err:
            if self._cloud_passed:
                raise
            if local_error is not None:
                raise FallbackFailedError(local_error, err) from err
            raise _rewrite(err, f"the request went to the cloud because {self.decision.reason}") from err
        finally:
            if owned:
                fallback.close()


def _rewrite(err: BaseException, note: str) -> SmolEdgeError:
    """The same kind of error with ``note`` added to its one-line message."""
    if isinstance(err, SmolEdgeError) and type(err).__init__ is SmolEdgeError.__init__:
        new = type(err)(f"{err.message}; {note}", hint=err.hint)
        for attr in ("status", "retry_after"):
            if hasattr(err, attr):
                setattr(new, attr, getattr(err, attr))
        return new
    what = "out of memory" if isinstance(err, MemoryError) else describe_error(err)
    return BackendError(f"local inference failed: {what}; {note}",
                        hint="free memory, use a smaller image, or allow the cloud fallback")
