"""Readiness answers in time even when PostgreSQL takes a query and never answers, and
does not pile up queries on such a server (a hand-written pool that never answers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from services import ops
from services.ops import Probes, newest_migration


class SilentPool:
    """Hands out a connection whose queries never get an answer; counts them."""

    def __init__(self) -> None:
        self.queries = 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[SilentPool]:
        yield self

    async def fetchval(self, *_: Any) -> Any:
        self.queries += 1
        await asyncio.Event().wait()  # never answered


async def test_a_silent_database_fails_readiness_in_time_with_one_query_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ops, "READY_TIMEOUT_SECONDS", 0.05)
    pool = SilentPool()
    probes = Probes(pool, None)  # type: ignore[arg-type]
    for _ in range(3):
        async with asyncio.timeout(1):
            assert await probes.failing() == ["postgresql unreachable"]
    assert pool.queries == 1  # the first one is still out: no second one is sent
    assert probes._probe is not None
    probes._probe.cancel()  # what a closing pool does to it; nobody is told
    await asyncio.sleep(0)


class AnsweringPool:
    """Answers ``SELECT 1``; the schema question as told (or no migrations table at all)."""

    def __init__(self, migrated: bool | None, refusal: Exception | None = None) -> None:
        self.migrated = migrated
        self.refusal = refusal

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[AnsweringPool]:
        yield self

    async def fetchval(self, query: str, *_: Any) -> Any:
        if "schema_migrations" not in query:
            return 1
        if self.refusal is not None:
            raise self.refusal
        if self.migrated is None:
            raise asyncpg.UndefinedTableError("relation schema_migrations does not exist")
        return self.migrated


@pytest.mark.parametrize(
    ("migrated", "connected", "failing"),
    [
        (True, True, []),
        (True, False, ["nats unreachable"]),
        (False, True, ["schema"]),
        (None, True, ["schema"]),  # not even the migrations table: an empty database
        (None, False, ["schema", "nats unreachable"]),
    ],
)
async def test_readiness_says_what_is_missing(
    migrated: bool | None, connected: bool, failing: list[str]
) -> None:
    nats = SimpleNamespace(is_connected=connected)
    probes = Probes(AnsweringPool(migrated), nats)  # type: ignore[arg-type]
    answer = await probes.failing()
    expected = [
        f"postgresql schema not migrated to {newest_migration()} (run clinic migrate)"
        if item == "schema"
        else item
        for item in failing
    ]
    assert answer == expected


async def test_a_process_still_starting_is_not_ready() -> None:
    started = asyncio.Event()
    probes = Probes(AnsweringPool(True), SimpleNamespace(is_connected=True), started)  # type: ignore[arg-type]
    assert await probes.failing() == ["starting"]
    started.set()
    assert await probes.failing() == []


async def test_a_refused_schema_question_is_no_missing_schema() -> None:
    """PostgreSQL shutting down (57P01) mid-probe: unreachable, not "run clinic migrate"."""
    refusal = asyncpg.AdminShutdownError("terminating connection due to administrator command")
    probes = Probes(AnsweringPool(True, refusal), SimpleNamespace(is_connected=True))  # type: ignore[arg-type]
    assert await probes.failing() == ["postgresql unreachable"]


class HangingPool(SilentPool):
    """A hanging server as the probes meet it: the pool's wait for a connection runs out
    (a bare ``TimeoutError``) while a probe's own wait runs out first."""

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[SilentPool]:
        await asyncio.sleep(0.08)
        raise TimeoutError
        yield self  # pragma: no cover


async def test_a_hanging_database_is_logged_once_however_the_probes_time_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ops, "READY_TIMEOUT_SECONDS", 0.05)
    probes = Probes(HangingPool(), None)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="services.ops"):
        for _ in range(6):  # the probe's wait, then the pool's (seen by the next), by turns
            assert await probes.failing() == ["postgresql unreachable"]
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert warnings == ["readiness: postgresql unreachable: no answer within 0.05 s"], warnings


class ResettingPool(SilentPool):
    """Connections reset at once (a balancer without a backend), told in two ways by turns."""

    def __init__(self) -> None:
        super().__init__()
        self.resets = 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[SilentPool]:
        self.resets += 1
        if self.resets % 2:
            raise ConnectionResetError(104, "Connection reset by peer")
        raise ConnectionError("unexpected connection_lost() call")
        yield self  # pragma: no cover


async def test_connections_reset_are_logged_once_however_they_are_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probes = Probes(ResettingPool(), None)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="services.ops"):
        for _ in range(6):
            assert await probes.failing() == ["postgresql unreachable"]
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "Connection reset by peer" in warnings[0]


async def test_a_new_cause_after_lost_connections_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A certificate refused once connections come back is news, not more of the same."""
    pool = ResettingPool()
    probes = Probes(pool, None)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="services.ops"):
        await probes.failing()

        @contextlib.asynccontextmanager
        async def refused(*_: object) -> AsyncIterator[None]:
            raise ssl.SSLCertVerificationError("certificate has expired")
            yield  # pragma: no cover

        pool.acquire = refused  # type: ignore[method-assign,assignment]
        await probes.failing()
        await probes.failing()
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 2 and "certificate has expired" in warnings[1], warnings
