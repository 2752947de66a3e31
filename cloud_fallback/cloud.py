"""Failover across an ordered list of cloud models, with retries, cooldown and a ledger row per call.

:class:`CloudFallback` holds what must outlive one call: the HTTP client, the :class:`Cooldown`, the
price book and the ledger.  Keep one for as long as failures should be remembered (a server keeps
one; ``answer`` makes one per request when none is given).  Clock, sleep and random draws are
constructor arguments, not hidden globals.

Before the first call the router's ``/models`` listing is read (cached in-process and on disk for
``CloudConfig.models_ttl_s``): its prices feed the spend cap and the ledger, its context windows skip a
target the request does not fit, with the reason.  The images are encoded once per request.

Per model: up to ``RetryConfig.attempts`` tries on 429 / 5xx / timeouts before the router answered,
waiting the Retry-After or an exponential backoff with jitter; then the next model.  Once the router's
200 status line has arrived the provider is generating (and billing), so that call is never retried
on the same model (only a stream's explicit ``overloaded`` error is).  A 400/404/413/422 (not served,
or not this request), a malformed or empty answer moves on at once; errors the request caused
(400/413/422, a stream's validation error) never cool a model down.  401/403, 402 and the spend cap stop
everything (token, credit and cap are the same for every model).  Once an answer's first chunk has been
passed on, nothing is retried: a failure ends the stream with an error instead of a duplicated answer.

One time budget bounds the wait for an answer - attempts, targets, Retry-After sleeps and each call's
silence or trickle before its first chunk: the caller's deadline (which bounds the whole answer too),
else ``CloudConfig.budget_s`` (after the first chunk, only the call's ``total_timeout_s``).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smoledge.errors import (
    CloudAuthError,
    CloudCreditError,
    CloudDisabledError,
    CloudError,
    CloudModelError,
    CloudRateLimitError,
    CloudUnavailableError,
)
from smoledge.runtime.manifest import Manifest
from smoledge.runtime.types import ChatRequest, StreamChunk

from .client import CallRecord, RouterClient, tag
from .config import DEFAULT_MODELS, CloudConfig, RouterConfig, hub_offline, listing_path
from .ledger import Ledger, LedgerEntry
from .policy import Decision
from .pricing import PriceBook, fetch_price_book
from .request_builder import build_chat_call, provider_of, to_openai_messages
from .retry import Backoff, Cooldown
from .spend import SpendCap

_STOP = (CloudAuthError, CloudCreditError)  # the same token and credit serve every model
_RETRY = (CloudRateLimitError, CloudUnavailableError)  # anything else moves on to the next model at once


class _OutOfTime(Exception):
    """The time budget ran out: no further attempt or target is tried."""


class _AnswerBroken(Exception):
    """A call failed after passing chunks on: carried past the retry loop, never retried."""

    def __init__(self, error: CloudError):
        super().__init__(error.message)
        self.error = error


def cloud_targets(config: CloudConfig, manifest: Manifest | None) -> tuple[str, ...]:
    """The ordered models to try: the config's list, else the bundle's substitute + alternatives, else defaults."""
    if config.models:
        return config.models
    if manifest is None:
        return DEFAULT_MODELS
    cloud = manifest.cloud
    listed = ([cloud.substitute_model] if cloud.substitute_model else []) + list(cloud.alternatives)
    return tuple(listed) or DEFAULT_MODELS


class CloudFallback:
    def __init__(
        self,
        config: CloudConfig,
        *,
        ledger: Ledger | None = None,
        project: str = "default",
        cooldown: Cooldown | None = None,
        spend_cap: SpendCap | None = None,
        cache_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.config = config
        self.ledger = ledger
        self.project = project
        self.cooldown = cooldown or Cooldown(config.cooldown)
        self.spend_cap = spend_cap
        self.backoff = Backoff(config.retry)
        self._listing_cache = listing_path(cache_dir) if cache_dir is not None else None
        self._clock, self._sleep, self._rng = clock, sleep, rng or random.Random()
        self._client: RouterClient | None = None
        self._prices: tuple[float, PriceBook] | None = None  # (monotonic time fetched, book)
        self._lock = threading.Lock()  # a server's request threads share one fallback

    @staticmethod
    def from_config(config: RouterConfig, **kwargs: Any) -> CloudFallback:
        """The fallback a router config describes: its ledger, project, spend cap and listing cache."""
        ledger = Ledger(config.ledger.path, timeout_s=config.ledger.lock_timeout_s) if config.ledger.enabled else None
        return CloudFallback(config.cloud, ledger=ledger, project=config.ledger.project,
                             spend_cap=SpendCap.from_config(config.ledger), cache_dir=config.cache_dir, **kwargs)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def client(self) -> RouterClient:
        with self._lock:
            if self._client is None:
                self._client = RouterClient(self.config)
            return self._client

    def token(self) -> str:
        from smoledge.redact import checked_token

        if self.config.token is not None:
            return checked_token(self.config.token)
        from huggingface_hub import get_token

        token = get_token()
        if not token:
            raise tag(CloudAuthError("no Hugging Face token found for the cloud fallback",
                                     hint="set HF_TOKEN or run `hf auth login`, or turn the cloud off with --no-cloud"),
                      "no_token")
        return checked_token(token)

    def stream(self, request: ChatRequest, targets: tuple[str, ...], decision: Decision, *,
               deadline: float | None = None, needed_tokens: int | None = None) -> Iterator[StreamChunk]:
        """Stream an answer from the first target that gives one; raise the last error when none does.

        ``deadline`` (on this object's clock) ends the whole cloud path, else ``CloudConfig.budget_s`` from
        now; ``needed_tokens`` (prompt + new tokens) skips a target whose context window is smaller.
        """
        if hub_offline():
            raise CloudDisabledError("HF_HUB_OFFLINE is set, so nothing is sent to the cloud",
                                     hint="unset HF_HUB_OFFLINE to allow the cloud fallback")
        end = deadline if deadline is not None else self._clock() + self.config.budget_s
        token = self.token()
        book = self._price_book(end, token)
        messages = to_openai_messages(request.messages, self.config.uploads)  # once, not per attempt or target
        failures: list[tuple[str, CloudError]] = []
        for target in targets:
            skipped = self._skip(target, book, needed_tokens)
            if skipped is not None:
                failures.append((target, skipped))
                continue
            call = build_chat_call(request, target, base_url=self.config.base_url, token=token,
                                   bill_to=self.config.bill_to, messages=messages)
            try:
                done = yield from self._try_target(call, request, target, decision, book, (end, deadline), failures)
            except _AnswerBroken as broken:
                self.cooldown.failed(target, self._clock())
                raise broken.error from broken.error.__cause__
            except _OutOfTime:
                break
            if done:
                return
        raise _all_failed(failures)

    def _skip(self, target: str, book: PriceBook, needed_tokens: int | None) -> CloudError | None:
        wait = self.cooldown.remaining(target, self._clock())
        if wait > 0:
            return tag(CloudUnavailableError(f"{target} is cooling down for {wait:.0f} s after repeated failures",
                                             hint="wait, or list alternative models in SMOLEDGE_CLOUD_MODELS"),
                       "cooldown")
        window = book.context_window(target)
        if needed_tokens is not None and window is not None and needed_tokens > window:
            return tag(CloudModelError(f"{target} was skipped: its context window of {window:,} tokens is smaller "
                                       f"than the {needed_tokens:,} this request needs",
                                       hint="list a model with a larger window, or shorten the request"),
                       "context", cools=False)
        return None

    def _try_target(self, call, request: ChatRequest, target: str, decision: Decision, book: PriceBook,
                    ends: tuple[float, float | None], failures: list) -> Iterator[StreamChunk]:
        end = ends[0]  # the budget's end: no attempt starts and no sleep runs past it
        for attempt in range(self.config.retry.attempts):
            if end - self._clock() <= 0:  # nothing sent, so no ledger row
                failures.append((target, _budget_error(None)))
                raise _OutOfTime()
            if self.spend_cap is not None:
                self.spend_cap.check(self.ledger, self.project, datetime.now(UTC).date(), book.highest(),
                                     request.sampling.max_new_tokens)
            record = CallRecord(target=target, provider=provider_of(target))
            try:
                yield from self._one_call(call, record, decision, book, request.sampling.max_new_tokens, ends)
                self.cooldown.succeeded(target)
                return True
            except _STOP:
                raise
            except CloudError as err:
                if getattr(err, "status", "") == "budget":
                    failures.append((target, _budget_error(err)))
                    raise _OutOfTime() from err
                delay = self._retry_delay(err, record, attempt)
                left = end - self._clock()
                if delay is not None and delay >= left:
                    failures.append((target, err))
                    failures.append((target, _budget_error(None)))
                    raise _OutOfTime() from err
                if delay is None:
                    if getattr(err, "cools", True):
                        self.cooldown.failed(target, self._clock())
                    failures.append((target, err))
                    return False
                self._sleep(delay)
        return False

    def _retry_delay(self, err: CloudError, record: CallRecord, attempt: int) -> float | None:
        """Seconds to wait before trying the same model again, or None: move on.  Never after a 200 (billing)."""
        if not isinstance(err, _RETRY):
            return None
        if record.answered and getattr(err, "status", "") != "stream_overloaded":
            return None
        return self.backoff.delay(attempt, retry_after=getattr(err, "retry_after", None), rand=self._rng.random())

    def _one_call(self, call, record: CallRecord, decision: Decision, book: PriceBook, max_tokens: int,
                  ends: tuple[float, float | None]) -> Iterator[StreamChunk]:
        """One call; the caller's deadline bounds all of it, the budget only the wait for its first chunk."""
        passed_on = 0
        try:
            for chunk in self.client().stream_chat(call, record, deadline=ends[1], first_by=ends[0]):
                passed_on += 1
                yield chunk
        except CloudError as err:
            record.status = getattr(err, "status", "error")
            if passed_on:
                raise _AnswerBroken(_mid_stream(err, passed_on)) from err
            raise
        except GeneratorExit:
            record.status = "cancelled"
            raise
        finally:
            if record.status == "started":
                record.status = "error"
            self._record(record, decision, book, max_tokens)

    def _record(self, record: CallRecord, decision: Decision, book: PriceBook, max_tokens: int) -> None:
        """One ledger row per call, best-effort: a ledger failure is a warning, never a lost answer."""
        if self.ledger is None:
            return
        if not record.answered:
            cost: float | None = 0.0  # refused or unreachable before the provider started: nothing billed
        else:
            cost = book.estimate(record.target, record.provider, record.tokens_in, record.tokens_out)
        self.ledger.record(LedgerEntry.now(
            project=self.project, route_code=decision.code, route_reason=decision.reason,
            provider=record.provider, model=record.target, tokens_in=record.tokens_in,
            tokens_out=record.tokens_out, latency_s=round(record.latency_s, 4), status=record.status, cost_usd=cost,
            max_tokens=max_tokens,
        ))

    def _price_book(self, end: float, token: str) -> PriceBook:
        """Prices and windows from ``/models``: kept in-process and on disk for ``models_ttl_s``."""
        now, cached = self._clock(), self._prices
        if cached is not None and now - cached[0] < self._prices_ttl(cached[1]):
            return cached[1]
        book = fetch_price_book(self.client(), token, cache=self._listing_cache, now=time.time(),
                                ttl_s=self.config.models_ttl_s, deadline=min(end, now + self.config.pricing_timeout_s))
        self._prices = (now, book)
        return book

    def _prices_ttl(self, book: PriceBook) -> float:
        # an empty book (listing unavailable) is asked for again sooner
        return self.config.models_ttl_s if book.prices or book.contexts else min(60.0, self.config.models_ttl_s)


def _budget_error(cause: CloudError | None) -> CloudError:
    what = f" ({cause.message})" if cause is not None else ""
    return tag(CloudUnavailableError(f"the cloud time budget ran out{what}",
                                     hint="raise --deadline, or SMOLEDGE_CLOUD_BUDGET_S "
                                          f"(default {CloudConfig.budget_s:g} s)"), "budget")


def _mid_stream(err: CloudError, passed_on: int) -> CloudError:
    new = type(err)(f"{err.message}, after {passed_on} chunks of the answer had been streamed; "
                    "not retried, to avoid a duplicated answer", hint=err.hint)
    new.__cause__ = err
    return tag(new, getattr(err, "status", "error"))


def _all_failed(failures: list[tuple[str, CloudError]]) -> CloudError:
    if not failures:
        return tag(CloudModelError("no cloud model is configured",
                                   hint="set SMOLEDGE_CLOUD_MODELS or the bundle's cloud.substitute_model"), "no_model")
    last = failures[-1][1]
    if len(failures) == 1:
        return last
    causes = "; ".join(err.message if err.message.startswith(target) else f"{target}: {err.message}"
                       for target, err in failures)
    return tag(type(last)(f"no cloud model could answer ({causes})", hint=last.hint), getattr(last, "status", "error"))
