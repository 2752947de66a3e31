"""The spend cap: enforced from the ledger before each cloud call, never sent past; shown by `smoledge usage`."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from test_cloud_fakes import CLOUD_TEXT, TOKEN, CannedEngine, make_config, request_with_images, router  # noqa: F401

from smoledge import cli
from smoledge.cloud_fallback import LedgerConfig, SpendCap, answer_text
from smoledge.cloud_fallback.config import ledger_config_from_env
from smoledge.cloud_fallback.ledger import Ledger, LedgerEntry
from smoledge.errors import CloudCreditError, ConfigError

HIGHEST_OUT = 1.5  # USD per million output tokens: the fake listing's highest price (acme/vlm-large)


def _config(tmp_path, router, cap, period="day"):  # noqa: F811
    cfg = make_config(tmp_path, router)
    return replace(cfg, ledger=replace(cfg.ledger, spend_cap_usd=cap, spend_cap_period=period))


def _spent(path, cost, *, day=None, max_tokens=32, project="test", tokens_in=None):
    stamp = datetime.now(UTC)
    day = day or stamp.date().isoformat()
    Ledger(path).append(LedgerEntry(time=stamp.isoformat(timespec="seconds"), day=day, project=project,
                                    route_code="oversize", route_reason="r", provider="fake-provider",
                                    model="acme/vlm-large:fastest", tokens_in=tokens_in, tokens_out=None,
                                    latency_s=1.0, status="ok" if cost is not None else "dropped", cost_usd=cost,
                                    max_tokens=max_tokens))


def _oversized(cfg, max_new_tokens=32):
    return answer_text(request_with_images(1, max_new_tokens=max_new_tokens), CannedEngine(tiles_per_image=17),
                       config=cfg)


def test_with_the_cap_reached_no_request_reaches_the_router(tmp_path, router):  # noqa: F811
    cfg = _config(tmp_path, router, cap=0.01)
    assert _oversized(cfg).text == CLOUD_TEXT  # well under the cap; fetches and caches /v1/models
    _spent(cfg.ledger.path, 0.012)  # another run of the same project spent more meanwhile
    before = len(router.requests)
    with pytest.raises(CloudCreditError) as info:
        _oversized(cfg)
    assert len(router.requests) == before  # refused before any call: not even /v1/models (it is cached)
    message = str(info.value)
    assert "daily cloud spend cap of $0.01 for project 'test' is reached" in message
    assert "$0.0126 spent since" in message and "not sent" in message
    assert "raise it with SMOLEDGE_SPEND_CAP_USD" in message and "`smoledge usage`" in message


def test_this_requests_worst_case_counts_at_the_highest_price(tmp_path, router):  # noqa: F811
    cfg = _config(tmp_path, router, cap=0.001)
    with pytest.raises(CloudCreditError, match=r"may cost up to \$0.0015"):
        _oversized(cfg, max_new_tokens=1000)  # 1,000 x $1.5 per million > $0.001
    assert router.chat_requests() == []
    assert _oversized(cfg, max_new_tokens=32).text == CLOUD_TEXT  # 32 x $1.5 per million fits


def test_calls_of_unknown_cost_count_at_the_highest_price(tmp_path, router):  # noqa: F811
    cfg = _config(tmp_path, router, cap=0.01)
    _spent(cfg.ledger.path, None, max_tokens=8000)  # 8,000 x $1.5 per million = $0.012 worst case
    with pytest.raises(CloudCreditError, match=r"\$0.0120 spent since .*1 calls of unknown cost counted at the high"):
        _oversized(cfg)
    assert router.chat_requests() == []


def test_the_cap_is_per_project_and_per_period(tmp_path, router):  # noqa: F811
    cfg = _config(tmp_path, router, cap=0.01, period="month")
    today = datetime.now(UTC).date()
    last_month = (today.replace(day=1) - timedelta(days=1)).isoformat()
    _spent(cfg.ledger.path, 5.0, day=last_month)
    _spent(cfg.ledger.path, 5.0, project="someone-else")
    assert _oversized(cfg).text == CLOUD_TEXT
    cap = SpendCap(1.0, "month")
    assert cap.since(date(2026, 3, 17)) == "2026-03-01" and SpendCap(1.0).since(date(2026, 3, 17)) == "2026-03-17"


def test_the_cap_cannot_be_enforced_without_prices_so_nothing_is_sent(tmp_path, router):  # noqa: F811
    cfg = _config(tmp_path, router, cap=5.0)
    cfg = replace(cfg, cloud=replace(cfg.cloud, base_url=router.url.replace("/v1", "/nowhere")))
    with pytest.raises(CloudCreditError, match="cannot be enforced: no cloud prices are known"):
        _oversized(cfg)
    assert router.chat_requests() == []


def test_the_cap_comes_from_the_environment(tmp_path):
    env = {"SMOLEDGE_SPEND_CAP_USD": "2.5", "SMOLEDGE_SPEND_CAP_PERIOD": "month"}
    config = ledger_config_from_env(env, tmp_path, "p")
    assert (config.spend_cap_usd, config.spend_cap_period, config.project) == (2.5, "month", "p")
    assert ledger_config_from_env({}, tmp_path).spend_cap_usd is None
    with pytest.raises(ConfigError, match="SMOLEDGE_SPEND_CAP_USD='lots'"):
        ledger_config_from_env({"SMOLEDGE_SPEND_CAP_USD": "lots"}, tmp_path)
    with pytest.raises(ConfigError, match="'week' is not 'day' or 'month'"):
        LedgerConfig(path=tmp_path / "l.sqlite", spend_cap_usd=1.0, spend_cap_period="week")


def test_usage_shows_the_spend_against_the_cap(tmp_path, router, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("SMOLEDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SMOLEDGE_SPEND_CAP_USD", "0.5")
    cfg = replace(_config(tmp_path, router, cap=0.5),
                  ledger=LedgerConfig(path=tmp_path / "cloud_ledger.sqlite", project="alpha", spend_cap_usd=0.5))
    _oversized(cfg)
    _spent(cfg.ledger.path, None, max_tokens=1000, project="alpha")
    capsys.readouterr()
    assert cli.main(["usage"]) == 0
    out = capsys.readouterr().out
    assert "spend cap: $0.5 daily per project (SMOLEDGE_SPEND_CAP_USD), since" in out
    worst = (1200 * 0.5 + 8 * 1.5) / 1e6 + 1000 * HIGHEST_OUT / 1e6
    assert f"alpha: ${worst:.4f} of $0.5 (0%), 1 calls of unknown cost at the highest price" in out
    assert TOKEN not in out


def test_over_the_cap_a_request_that_fits_is_answered_locally(tmp_path, router):  # noqa: F811
    from test_cloud_fakes import LOCAL_TEXT

    from smoledge.cloud_fallback import LocalHealth

    cfg = _config(tmp_path, router, cap=0.0)
    unhealthy = LocalHealth(consecutive_failures=3, last_error="kernel crashed")  # would send it away
    engine = CannedEngine()
    reply = answer_text(request_with_images(1), engine, config=cfg, health=unhealthy)
    assert reply.text == LOCAL_TEXT and engine.streams == 1 and router.chat_requests() == []
    assert [d.code for d in reply.decisions] == ["local-unhealthy", "spend-cap"]
    assert "spend cap of $0 for project 'test' is reached" in reply.decision.reason
    assert "not sent; answered locally instead (fits raspberry-pi-5-4gb: " in reply.decision.reason
    with pytest.raises(CloudCreditError, match="spend cap"):  # one that does not fit is refused
        _oversized(cfg)
