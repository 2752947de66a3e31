"""``smoledge usage``: totals of the cloud usage ledger by project, model, provider or day, CSV export, and
where each project stands against the spend cap (``SMOLEDGE_SPEND_CAP_USD``)."""

from __future__ import annotations

import argparse
import os
import sys
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from smoledge.cloud_fallback.config import default_cache_dir, ledger_config_from_env, ledger_path, listing_path
from smoledge.cloud_fallback.ledger import GROUPINGS, Ledger, Total
from smoledge.cloud_fallback.pricing import Price, cached_price_book
from smoledge.cloud_fallback.spend import SpendCap
from smoledge.errors import ConfigError

SINCE_FORMS = "YYYY-MM-DD (that day), YYYY-MM (that month's first day) or Nd (N days ago, 0d = today), in UTC"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--by", choices=sorted(GROUPINGS), default="project", help="group totals by (default project)")
    parser.add_argument("--project", default=None, metavar="TAG", help="only this project")
    parser.add_argument("--since", default=None, metavar="DAY",
                        help=f"only calls on or after this day: {SINCE_FORMS}")
    parser.add_argument("--csv", default=None, metavar="FILE", help="export the raw rows as CSV ('-' for stdout)")
    parser.add_argument("--ledger", type=Path, default=None, metavar="PATH",
                        help="ledger file (default cloud_ledger.sqlite in $SMOLEDGE_CACHE_DIR or the user cache dir)")


def parse_since(text: str | None, today: date | None = None) -> str | None:
    """``--since`` as the ledger's day string (YYYY-MM-DD); anything else is a one-line error with the forms."""
    if text is None:
        return None
    today = today or datetime.now(UTC).date()
    value = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return date.fromisoformat(value).isoformat()
        if re.fullmatch(r"\d{4}-\d{2}", value):
            return date.fromisoformat(value + "-01").isoformat()
        if re.fullmatch(r"\d{1,5}d", value):
            return (today - timedelta(days=int(value[:-1]))).isoformat()
    except ValueError:
        pass
    raise ConfigError(f"--since {text!r} is not a day I can read", hint=f"give {SINCE_FORMS}")


def main(args: argparse.Namespace) -> int:
    args.since = parse_since(args.since)
    cache_dir = default_cache_dir()
    ledger = Ledger(args.ledger or ledger_path(cache_dir))
    cap = SpendCap.from_config(ledger_config_from_env(os.environ, cache_dir))
    if args.csv is not None:
        if args.csv == "-":
            ledger.export_csv(sys.stdout, project=args.project, since=args.since)
            return 0
        with open(args.csv, "w", newline="", encoding="utf-8") as out:
            count = ledger.export_csv(out, project=args.project, since=args.since)
        print(f"wrote {count} cloud calls to {args.csv}")
        return 0
    totals = ledger.totals(args.by, project=args.project, since=args.since)
    if not totals:
        print(f"no cloud calls recorded in {ledger.path}")
    else:
        print(render(totals, args.by))
    if cap is not None:
        print(render_cap(cap, ledger, cached_price_book(listing_path(cache_dir)).highest(), args.project))
    return 0


def render_cap(cap: SpendCap, ledger: Ledger, highest: Price | None, project: str | None) -> str:
    """Each project's spend this period against the cap (unknown costs at the highest cached price)."""
    since = cap.since(datetime.now(UTC).date())
    projects = sorted({e.project for e in ledger.entries(project=project, since=since)})
    lines = [f"spend cap: ${cap.usd:g} {cap.label} per project (SMOLEDGE_SPEND_CAP_USD), since {since}"]
    high = highest or Price(0.0, 0.0)
    for name in projects:
        spend = ledger.spend(name, since, max_in=high.input_per_million, max_out=high.output_per_million)
        unknown = f", {spend.unknown_calls} calls of unknown cost at the highest price" if spend.unknown_calls else ""
        lines.append(f"  {name}: ${spend.worst_case_usd:.4f} of ${cap.usd:g} "
                     f"({100 * spend.worst_case_usd / cap.usd if cap.usd else 100:.0f}%){unknown}")
    if not projects:
        lines.append("  nothing spent yet")
    return "\n".join(lines)


def render(totals: list[Total], by: str) -> str:
    header = (by, "calls", "ok", "tokens in", "tokens out", "cost USD", "mean s")
    rows = [(t.key, str(t.calls), str(t.ok), f"{t.tokens_in:,}", f"{t.tokens_out:,}", f"{t.cost_usd:.6f}",
             f"{t.mean_latency_s:.2f}") for t in totals]
    rows.append(("TOTAL", str(sum(t.calls for t in totals)), str(sum(t.ok for t in totals)),
                 f"{sum(t.tokens_in for t in totals):,}", f"{sum(t.tokens_out for t in totals):,}",
                 f"{sum(t.cost_usd for t in totals):.6f}", ""))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    return "\n".join(lines)
