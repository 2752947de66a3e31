"""Prices and context windows from the router's ``/models`` listing (USD per million input / output tokens).

:class:`PriceBook` is built from that listing (pure); ``fetch_price_book`` makes the one call, or reads
the copy cached on disk (``cloud_models.json`` in the cache folder, reused for ``CloudConfig.models_ttl_s``).
A price is only known when the provider that served a call is known (the ``x-inference-provider``
header or a ``:provider`` suffix); otherwise the ledger records no cost rather than a guess, and the
spend cap counts that call at the highest known price.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from smoledge.errors import CloudError

from .request_builder import ROUTING_POLICIES, split_target

log = logging.getLogger("smoledge.cloud_fallback.pricing")


@dataclass(frozen=True)
class Price:
    input_per_million: float
    output_per_million: float

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_million + tokens_out * self.output_per_million) / 1e6


@dataclass(frozen=True)
class PriceBook:
    prices: dict[tuple[str, str], Price] = field(default_factory=dict)  # (model id, provider) -> price
    contexts: dict[tuple[str, str], int] = field(default_factory=dict)  # (model id, provider) -> window

    @staticmethod
    def from_listing(models: list[dict]) -> PriceBook:
        prices, contexts = {}, {}
        for model in models:
            if not isinstance(model, dict):
                continue
            for entry in model.get("providers") or []:
                if not isinstance(entry, dict):
                    continue
                key = (str(model.get("id")), str(entry.get("provider")))
                price, window = _price(entry), _int(entry.get("context_length"))
                if price is not None:
                    prices[key] = price
                if window is not None:
                    contexts[key] = window
        return PriceBook(prices, contexts)

    def highest(self) -> Price | None:
        """The highest input and output prices listed (the spend cap's worst case), or None when none is."""
        if not self.prices:
            return None
        return Price(max(p.input_per_million for p in self.prices.values()),
                     max(p.output_per_million for p in self.prices.values()))

    def context_window(self, target: str) -> int | None:
        """The largest context window a target may be served with (its pinned provider's), None if unknown."""
        model, suffix = split_target(target)
        windows = [w for (m, provider), w in self.contexts.items()
                   if m == model and (suffix is None or suffix in ROUTING_POLICIES or provider == suffix)]
        return max(windows) if windows else None

    def estimate(self, target: str, provider: str | None, tokens_in: int | None,
                 tokens_out: int | None) -> float | None:
        if provider is None or tokens_in is None or tokens_out is None:
            return None
        price = self.prices.get((split_target(target)[0], provider))
        return None if price is None else price.cost(tokens_in, tokens_out)


def _price(entry: object) -> Price | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("pricing"), dict):
        return None
    try:
        return Price(float(entry["pricing"]["input"]), float(entry["pricing"]["output"]))
    except (KeyError, TypeError, ValueError):
        return None


def _int(value: object) -> int | None:
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def fetch_price_book(client, token: str | None, *, cache: Path | None = None, now: float = 0.0,
                     ttl_s: float = 0.0, deadline: float | None = None) -> PriceBook:
    """The router's prices and windows: from ``cache`` if younger than ``ttl_s`` (epoch ``now``), else fetched
    (and cached); an empty book when neither works (costs and windows unknown)."""
    base_url = client.config.base_url
    listing = _read_cache(cache, base_url, now, ttl_s)
    if listing is None:
        try:
            listing = client.list_models(token, deadline)
        except CloudError:
            return PriceBook()
        _write_cache(cache, base_url, now, listing)
    return PriceBook.from_listing(listing)


def _read_cache(cache: Path | None, base_url: str, now: float, ttl_s: float) -> list | None:
    if cache is None or not cache.is_file():
        return None
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        fresh = data["base_url"] == base_url and 0 <= now - float(data["fetched_at"]) < ttl_s
        return list(data["data"]) if fresh else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(cache: Path | None, base_url: str, now: float, listing: list) -> None:
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"base_url": base_url, "fetched_at": now, "data": listing}), encoding="utf-8")
        tmp.replace(cache)
    except (OSError, TypeError, ValueError) as err:
        log.warning("could not cache the cloud model listing in %s: %s", cache, err)


def cached_price_book(cache: Path) -> PriceBook:
    """The last listing cached on disk, however old (for ``smoledge usage``, which never goes online)."""
    try:
        return PriceBook.from_listing(list(json.loads(cache.read_text(encoding="utf-8"))["data"]))
    except (OSError, ValueError, KeyError, TypeError):
        return PriceBook()
