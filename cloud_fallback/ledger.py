"""The cloud usage ledger: one SQLite row per cloud call, in the user cache folder.

A row holds when, for which project, why the request went to the cloud, which provider and model,
tokens in/out, the answer's ``max_tokens``, latency, outcome (a short code) and estimated cost.  It never
holds a prompt, an image, an answer, a server error text or the token.  ``totals`` groups rows by
project, model or day for ``smoledge usage``; ``export_csv`` writes the raw rows; ``spend`` sums a
project's spend for the spend cap.

The file is in WAL mode (readers never wait for the writer) and each process keeps one connection per
ledger file.  ``record`` is best-effort: a ledger that cannot be written (no folder, another writer
holding the lock) is a warning, never a lost answer.
"""

from __future__ import annotations

import csv
import logging
import os
import sqlite3
import threading
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
    cost_usd REAL,
    max_tokens INTEGER
)
"""
_ADDED_COLUMNS = {"max_tokens": "INTEGER"}  # columns newer than the first ledgers, added on open
log = logging.getLogger("smoledge.cloud_fallback.ledger")
_POOL: dict[tuple[int, str], tuple[sqlite3.Connection, threading.Lock]] = {}  # (pid, file) -> one connection
_POOL_LOCK = threading.Lock()
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
    max_tokens: int | None = None

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


@dataclass(frozen=True)
class Spend:
    """A project's spend since a day: known costs, plus the worst case of calls whose cost is unknown."""

    known_usd: float
    unknown_calls: int
    worst_case_usd: float  # known + every unknown call at the highest known price

    @staticmethod
    def of(entries: list[LedgerEntry], max_in: float, max_out: float) -> Spend:
        known = sum(e.cost_usd for e in entries if e.cost_usd is not None)
        unknown = [e for e in entries if e.cost_usd is None]
        worst = sum(((e.tokens_in or 0) * max_in
                     + (e.tokens_out if e.tokens_out is not None else (e.max_tokens or 0)) * max_out) / 1e6
                    for e in unknown)
        return Spend(known, len(unknown), known + worst)


class Ledger:
    def __init__(self, path: Path, *, timeout_s: float = 5.0):
        self.path = Path(path)
        self.timeout_s = timeout_s

    def _connection(self) -> tuple[sqlite3.Connection, threading.Lock]:
        key = (os.getpid(), str(self.path.resolve()))
        with _POOL_LOCK:
            if key not in _POOL:
                _POOL[key] = (self._open(), threading.Lock())
            return _POOL[key]

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists()
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, check_same_thread=False, isolation_level=None)
            if fresh:
                os.chmod(self.path, 0o600)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
            have = {row[1] for row in conn.execute("PRAGMA table_info(cloud_calls)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    conn.execute(f"ALTER TABLE cloud_calls ADD COLUMN {column} {kind}")
            return conn
        except (OSError, sqlite3.Error) as err:
            raise _ledger_error(self.path, err, self.timeout_s) from err

    def _run(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        conn, lock = self._connection()
        try:
            with lock:
                return conn.execute(sql, params).fetchall()
        except sqlite3.Error as err:
            raise _ledger_error(self.path, err, self.timeout_s) from err

    def append(self, entry: LedgerEntry) -> None:
        """Write one row; raises ConfigError when the ledger cannot be written (see ``record``)."""
        placeholders = ", ".join("?" for _ in COLUMNS)
        self._run(f"INSERT INTO cloud_calls ({', '.join(COLUMNS)}) VALUES ({placeholders})", astuple(entry))

    def record(self, entry: LedgerEntry) -> bool:
        """``append``, best-effort: a failure is logged as a warning (the answer it belongs to is kept)."""
        try:
            self.append(entry)
            return True
        except ConfigError as err:
            log.warning("cloud call not recorded in the usage ledger: %s", err)
            return False

    def spend(self, project: str, since: str, *, max_in: float, max_out: float) -> Spend:
        """What ``project`` spent on or after day ``since`` (unknown costs at the given highest prices)."""
        return Spend.of(list(self.entries(project=project, since=since)), max_in, max_out)

    def entries(self, *, project: str | None = None, since: str | None = None) -> Iterator[LedgerEntry]:
        where, params = _filters(project, since)
        if not self.path.exists():
            return
        for row in self._run(f"SELECT {', '.join(COLUMNS)} FROM cloud_calls{where} ORDER BY id", params):
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
        return [Total(*row) for row in self._run(sql, params)]

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


def _ledger_error(path: Path, err: Exception, timeout_s: float) -> ConfigError:
    if isinstance(err, sqlite3.OperationalError) and "locked" in str(err).lower():
        return ConfigError(f"the usage ledger {path} is locked by another writer (waited {timeout_s:g} s)",
                           hint="another smoledge process or a `sqlite3` session holds it; close that session")
    return ConfigError(f"cannot open the usage ledger {path}: {err}",
                       hint="set SMOLEDGE_CACHE_DIR to a writable folder")
