"""`smoledge doctor` says whether the cloud can really be used: a token or not, and whether the router answers
(18 #8: it said "cloud fallback: allowed" with no token).  The router is the fake one on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
from test_cloud_fakes import TOKEN, router  # noqa: F401

from smoledge import cli


@pytest.fixture
def env(tmp_path, router, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SMOLEDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SMOLEDGE_CLOUD_BASE_URL", router.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no `hf auth login` token from this machine
    monkeypatch.delenv("SMOLEDGE_NO_CLOUD", raising=False)
    monkeypatch.delenv("SMOLEDGE_PROFILE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path


def test_no_token_is_said_and_nothing_is_sent(env, router, capsys):  # noqa: F811
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "cloud fallback: on, but no Hugging Face token is set" in out and "allowed" not in out
    assert router.requests == []


def test_a_token_and_a_router_that_answers(env, router, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"cloud fallback: on: token present, {router.url} answers (2 models listed)" in out
    assert TOKEN not in out
    assert [r.path for r in router.requests] == ["/v1/models"]
    assert router.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert cli.main(["doctor", "--json"]) == 0
    cloud = json.loads(capsys.readouterr().out)["cloud"]
    assert cloud == {"state": "on", "base_url": router.url, "token": True, "models_listed": 2, "router": "answers"}


def test_a_token_and_a_router_that_does_not_answer(env, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SMOLEDGE_CLOUD_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"cloud fallback: on: token present, but http://127.0.0.1:{port}/v1 does not answer: cannot list" in out


def test_never_cloud_makes_no_call(env, router, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("SMOLEDGE_NO_CLOUD", "1")
    assert cli.main(["doctor"]) == 0
    assert "cloud fallback: OFF (SMOLEDGE_NO_CLOUD)" in capsys.readouterr().out
    assert router.requests == []
