"""The cloud usage ledger: one SQLite row per cloud call, in the user cache folder.

A row holds when, for which project, why the request went to the cloud, which provider and model,
tokens in/out, latency, outcome and estimated cost.  It never holds a prompt, an image, an answer, a
server error text or the token.  ``totals`` groups rows by project, model or day for ``smoledge usage``;
``export_csv`` writes the raw rows.
"""

from __future__ import annotations

import csv
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import astuple, dataclass, fields
from datetime import datetime, UTC
from pathlib import Path
from typing import TextIO

from smoledge.errors import ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cloud_calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    day TEXT NOT NULL,
    project TEXT NOT NULL,
    route_code TEXT NOT NULL,
    route_reason TEXT NOT NULL,
    provider TEXT,
    model TEXT NOT NULL,
    tokens_in INTEGER,
    tokens_out INTEGER,
    latency_s REAL NOT NULL,
    status TEXT NOT NULL,
    cost_usd REAL
)
"""
GROUPINGS = {"project": "project", "model": "model", "day": "day", "provider": "provider"}


@dataclass(frozen=True)
class LedgerEntry:
    time: str
    day: str
    project: str
    route_code: str
    route_reason: str
    provider: str | None
    model: str
    tokens_in: int | None
    tokens_out: int | None
    latency_s: float
    status: str
    cost_usd: float | None

    @staticmethod
    def now(**values) -> LedgerEntry:
        stamp = datetime.now(UTC)
        return LedgerEntry(time=stamp.isoformat(timespec="seconds"), day=stamp.date().isoformat(), **values)


@dataclass(frozen=True)
class Total:
    key: str
    calls: int
    ok: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    mean_latency_s: float


COLUMNS = tuple(f.name for f in fields(LedgerEntry))


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists()
            conn = sqlite3.connect(self.path, timeout=5.0)
            if fresh:
                os.chmod(self.path, 0o600)
            conn.execute(_SCHEMA)
            return conn
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(f"cannot open the usage ledger {self.path}: {err}",
                              hint="set SMOLEDGE_CACHE_DIR to a writable folder") from err

    def append(self, entry: LedgerEntry) -> None:
        placeholders = ", ".join("?" for _ in COLUMNS)
        with self._connect() as conn:
            conn.execute(f"INSERT INTO cloud_calls ({', '.join(COLUMNS)}) VALUES ({placeholders})", astuple(entry))
        conn.close()

    def entries(self, *, project: str | None = None, since: str | None = None) -> Iterator[LedgerEntry]:
        where, params = _filters(project, since)
        if not self.path.exists():
            return
        conn = self._connect()
        try:
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM cloud_calls{where} ORDER BY id", params).fetchall()
        finally:
            conn.close()
        for row in rows:
            yield LedgerEntry(*row)

    def totals(self, by: str, *, project: str | None = None, since: str | None = None) -> list[Total]:
        if by not in GROUPINGS:
            raise ConfigError(f"cannot group usage by {by!r}", hint=f"use one of: {', '.join(GROUPINGS)}")
        if not self.path.exists():
            return []
        column = GROUPINGS[by]
        where, params = _filters(project, since)
        sql = (f"SELECT COALESCE({column}, '?'), COUNT(*), SUM(status = 'ok'), COALESCE(SUM(tokens_in), 0), "
               f"COALESCE(SUM(tokens_out), 0), COALESCE(SUM(cost_usd), 0.0), AVG(latency_s) "
               f"FROM cloud_calls{where} GROUP BY 1 ORDER BY 1")
        conn = self._connect()
        try:
            return [Total(*row) for row in conn.execute(sql, params).fetchall()]
        finally:
            conn.close()

    def export_csv(self, out: TextIO, *, project: str | None = None, since: str | None = None) -> int:
        writer = csv.writer(out)
        writer.writerow(COLUMNS)
        count = 0
        for entry in self.entries(project=project, since=since):
            writer.writerow(["" if v is None else v for v in astuple(entry)])
            count += 1
        return count


def _filters(project: str | None, since: str | None) -> tuple[str, list]:
    clauses, params = [], []
    if project is not None:
        clauses.append("project = ?")
        params.append(project)
    if since is not None:
        clauses.append("day >= ?")
        params.append(since)
    return ((" WHERE " + " AND ".join(clauses)) if clauses else ""), params
