"""The spend cap: a per-project daily or monthly budget in dollars, checked from the ledger before each cloud call.

A call is refused - never sent - when what the project spent this period plus this request's worst case
(its ``max_tokens`` at the highest listed output price) would pass the cap.  Calls whose cost the ledger
does not know (no usage, or an unpriced provider) count at the highest listed prices.  Pure apart from
the ledger read; the day is an explicit input.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from smoledge.errors import CloudCreditError, ConfigError

from .client import tag
from .config import LedgerConfig
from .ledger import Ledger, Spend
from .pricing import Price

_HINT = ("raise it with SMOLEDGE_SPEND_CAP_USD (LedgerConfig.spend_cap_usd), or wait for the next {period} (UTC); "
         "`smoledge usage` shows the spend")


@dataclass(frozen=True)
class SpendCap:
    usd: float
    period: str = "day"  # "day" or "month"

    @staticmethod
    def from_config(config: LedgerConfig) -> SpendCap | None:
        return None if config.spend_cap_usd is None else SpendCap(config.spend_cap_usd, config.spend_cap_period)

    @property
    def label(self) -> str:
        return "daily" if self.period == "day" else "monthly"

    def since(self, today: date) -> str:
        """The first day (ISO) this period's spend is counted from."""
        return (today if self.period == "day" else today.replace(day=1)).isoformat()

    def spend(self, ledger: Ledger, project: str, today: date, highest: Price) -> Spend:
        return ledger.spend(project, self.since(today), max_in=highest.input_per_million,
                            max_out=highest.output_per_million)

    def check(self, ledger: Ledger | None, project: str, today: date, highest: Price | None, max_tokens: int) -> None:
        """Raise CloudCreditError (status ``spend_cap``) unless a call of ``max_tokens`` fits under the cap."""
        where = f"project {project!r}"
        if highest is None:
            raise _refuse(f"the {self.label} cloud spend cap of ${self.usd:g} for {where} cannot be enforced: "
                          "no cloud prices are known (the router's /models listing could not be read)", self)
        if ledger is None:
            raise _refuse(f"the {self.label} cloud spend cap of ${self.usd:g} for {where} cannot be enforced "
                          "without the usage ledger", self)
        try:
            spent = self.spend(ledger, project, today, highest)
        except ConfigError as err:
            raise _refuse(f"the {self.label} cloud spend cap of ${self.usd:g} for {where} cannot be enforced: "
                          f"{err.message}", self) from err
        worst = max_tokens * highest.output_per_million / 1e6
        if spent.worst_case_usd + worst > self.usd:
            unknown = (f", {spent.unknown_calls} calls of unknown cost counted at the highest price"
                       if spent.unknown_calls else "")
            raise _refuse(f"the {self.label} cloud spend cap of ${self.usd:g} for {where} is reached: "
                          f"${spent.worst_case_usd:.4f} spent since {self.since(today)}{unknown}, and this request "
                          f"may cost up to ${worst:.4f}; not sent", self)


def _refuse(message: str, cap: SpendCap) -> CloudCreditError:
    return tag(CloudCreditError(message, hint=_HINT.format(period=cap.period)), "spend_cap", cools=False)
