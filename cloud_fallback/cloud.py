"""Failover across an ordered list of cloud models, with retries, cooldown and a ledger row per call.

:class:`CloudFallback` holds what must outlive one call: the HTTP client, the :class:`Cooldown`, the
price book and the ledger.  Keep one for as long as failures should be remembered (a server keeps
one; ``answer`` makes one per request when none is given).  Clock, sleep and random draws are
constructor arguments, not hidden globals.

Per model: up to ``RetryConfig.attempts`` tries on 429 / 5xx / timeouts / dropped connections, waiting
the Retry-After or an exponential backoff with jitter; then the next model.  A 400/404 (model not
served), a malformed answer or another 4xx moves on at once; 401/403 and 402 stop everything (the token or the
credit is the same for every model).  Once an answer's first chunk has been passed on, nothing is
retried: a failure ends the stream with an error instead of a duplicated answer.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from smoledge.errors import (
    CloudAuthError,
    CloudCreditError,
    CloudError,
    CloudModelError,
    CloudRateLimitError,
    CloudUnavailableError,
)
from smoledge.runtime.types import ChatRequest, StreamChunk

from .client import CallRecord, RouterClient, tag
from .config import DEFAULT_MODELS, CloudConfig
from .ledger import Ledger, LedgerEntry
from .policy import Decision
from .pricing import PriceBook, fetch_price_book
from .request_builder import build_chat_call, provider_of
from .retry import Backoff, Cooldown

_STOP = (CloudAuthError, CloudCreditError)  # the same token and credit serve every model
_RETRY = (CloudRateLimitError, CloudUnavailableError)  # anything else moves on to the next model at once


class _AnswerBroken(Exception):
    """A call failed after passing chunks on: carried past the retry loop, never retried."""

    def __init__(self, error: CloudError):
        super().__init__(error.message)
        self.error = error


def cloud_targets(config: CloudConfig, manifest: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The ordered models to try: the config's list, else the bundle's substitute + alternatives, else defaults."""
    if config.models:
        return config.models
    cloud = (manifest or {}).get("cloud") or {}
    first = [cloud["substitute_model"]] if cloud.get("substitute_model") else []
    listed = first + list(cloud.get("alternatives") or [])
    return tuple(str(m) for m in listed) or DEFAULT_MODELS


class CloudFallback:
    def __init__(
        self,
        config: CloudConfig,
        *,
        ledger: Ledger | None = None,
        project: str = "default",
        cooldown: Cooldown | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.config = config
        self.ledger = ledger
        self.project = project
        self.cooldown = cooldown or Cooldown(config.cooldown)
        self.backoff = Backoff(config.retry)
        self._clock, self._sleep, self._rng = clock, sleep, rng or random.Random()
        self._client: RouterClient | None = None
        self._prices: PriceBook | None = None
        self._token: str | None = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def client(self) -> RouterClient:
        if self._client is None:
            self._client = RouterClient(self.config)
        return self._client

    def token(self) -> str:
        if self.config.token is not None:
            return self.config.token
        from huggingface_hub import get_token

        token = get_token()
        if not token:
            raise tag(CloudAuthError("no Hugging Face token found for the cloud fallback",
                                     hint="set HF_TOKEN or run `hf auth login`, or turn the cloud off with --no-cloud"),
                      "no_token")
        return token

    def stream(self, request: ChatRequest, targets: tuple[str, ...], decision: Decision) -> Iterator[StreamChunk]:
        """Stream an answer from the first target that gives one; raise the last error when none does."""
        token = self._token = self.token()
        failures: list[tuple[str, CloudError]] = []
        for target in targets:
            wait = self.cooldown.remaining(target, self._clock())
            if wait > 0:
                failures.append((target, tag(CloudUnavailableError(
                    f"{target} is cooling down for {wait:.0f} s after repeated failures",
                    hint="wait, or list alternative models in SMOLEDGE_CLOUD_MODELS"), "cooldown")))
                continue
            try:
                done = yield from self._try_target(request, target, token, decision, failures)
            except _AnswerBroken as broken:
                self.cooldown.failed(target, self._clock())
                raise broken.error from broken.error.__cause__
            if done:
                return
        raise _all_failed(failures)

    def _try_target(self, request: ChatRequest, target: str, token: str, decision: Decision,
                    failures: list) -> Iterator[StreamChunk]:
        call = build_chat_call(request, target, base_url=self.config.base_url, token=token,
                               bill_to=self.config.bill_to)
        for attempt in range(max(1, self.config.retry.attempts)):
            try:
                yield from self._one_call(call, target, decision)
                self.cooldown.succeeded(target)
                return True
            except _STOP:
                raise
            except CloudError as err:
                delay = None
                if isinstance(err, _RETRY):
                    delay = self.backoff.delay(attempt, retry_after=getattr(err, "retry_after", None),
                                               rand=self._rng.random())
                if delay is None:
                    self.cooldown.failed(target, self._clock())
                    failures.append((target, err))
                    return False
                self._sleep(delay)
        return False

    def _one_call(self, call, target: str, decision: Decision) -> Iterator[StreamChunk]:
        record = CallRecord(target=target, provider=provider_of(target))
        passed_on = 0
        try:
            for chunk in self.client().stream_chat(call, record):
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
            self._record(record, decision)

    def _record(self, record: CallRecord, decision: Decision) -> None:
        if self.ledger is None:
            return
        cost = None
        if record.status == "ok" and record.provider and record.tokens_in is not None:
            cost = self._price_book().estimate(record.target, record.provider, record.tokens_in, record.tokens_out)
        self.ledger.append(LedgerEntry.now(
            project=self.project, route_code=decision.code, route_reason=decision.reason,
            provider=record.provider, model=record.target, tokens_in=record.tokens_in,
            tokens_out=record.tokens_out, latency_s=round(record.latency_s, 4), status=record.status, cost_usd=cost,
        ))

    def _price_book(self) -> PriceBook:
        if self._prices is None:
            self._prices = fetch_price_book(self.client(), self._token)
        return self._prices


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
    causes = "; ".join(f"{target}: {err.message}" for target, err in failures)
    return tag(type(last)(f"no cloud model could answer ({causes})", hint=last.hint), getattr(last, "status", "error"))
