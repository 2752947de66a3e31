"""Cost estimates from the router's ``/models`` listing (USD per million input / output tokens).

:class:`PriceBook` is built from that listing (pure); ``fetch_price_book`` makes the one call.  A price
is only known when the provider that served a call is known (the ``x-inference-provider`` header or a
``:provider`` suffix); otherwise the ledger records no cost rather than a guess.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smoledge.errors import CloudError

from .request_builder import split_target


@dataclass(frozen=True)
class Price:
    input_per_million: float
    output_per_million: float

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_million + tokens_out * self.output_per_million) / 1e6


@dataclass(frozen=True)
class PriceBook:
    prices: dict[tuple[str, str], Price] = field(default_factory=dict)  # (model id, provider) -> price

    @staticmethod
    def from_listing(models: list[dict]) -> PriceBook:
        prices = {}
        for model in models:
            if not isinstance(model, dict):
                continue
            for entry in model.get("providers") or []:
                price = _price(entry)
                if price is not None:
                    prices[(str(model.get("id")), str(entry.get("provider")))] = price
        return PriceBook(prices)

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


def fetch_price_book(client, token: str | None) -> PriceBook:
    """The router's current prices, or an empty book when the listing cannot be fetched (cost unknown)."""
    try:
        return PriceBook.from_listing(client.list_models(token))
    except CloudError:
        return PriceBook()
