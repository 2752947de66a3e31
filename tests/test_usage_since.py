"""``smoledge usage --since``: the forms it reads, and a one-line error with those forms for anything else
(``yesterday`` used to be taken as a day string and matched nothing: "no cloud calls recorded")."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

import pytest
from conftest import run_cli

from smoledge.cloud_fallback.ledger import Ledger, LedgerEntry
from smoledge.errors import ConfigError
from smoledge.usage import SINCE_FORMS, parse_since


@pytest.mark.parametrize("text, day", [("2026-03-17", "2026-03-17"), (" 2026-03-17 ", "2026-03-17"),
                                       ("2026-03", "2026-03-01"), ("0d", "2026-03-01"), ("1d", "2026-02-28"),
                                       ("30d", "2026-01-30"), (None, None)])
def test_the_forms_it_reads(text, day):
    assert parse_since(text, today=date(2026, 3, 1)) == day


@pytest.mark.parametrize("text", ["yesterday", "today", "2026-02-30", "2026-13", "17/03/2026", "7", "-1d", ""])
def test_anything_else_is_refused_with_the_forms(text):
    with pytest.raises(ConfigError) as info:
        parse_since(text, today=date(2026, 3, 1))
    assert info.value.hint == f"give {SINCE_FORMS}"


def _call(path, day: str) -> None:
    Ledger(path).append(LedgerEntry(time=f"{day}T12:00:00+00:00", day=day, project="survey", route_code="oversize",
                                    route_reason="r", provider="fake-provider", model="acme/vlm:fastest",
                                    tokens_in=10, tokens_out=5, latency_s=1.0, status="ok", cost_usd=0.001))


def test_the_cli_filters_by_it_and_refuses_yesterday(tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    today = datetime.now(UTC).date()
    for back in (0, 2, 40):
        _call(ledger, (today - timedelta(days=back)).isoformat())
    week = run_cli("usage", "--ledger", str(ledger), "--since", "7d")
    assert week.returncode == 0, week.stderr
    assert re.search(r"^TOTAL +2 +2 ", week.stdout, re.M), week.stdout  # the two calls of the last week, not 3
    bad = run_cli("usage", "--ledger", str(ledger), "--since", "yesterday")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"smoledge usage: error: --since 'yesterday' is not a day I can read (give {SINCE_FORMS})"]
    assert bad.stdout == ""
