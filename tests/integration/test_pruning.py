"""Stored answers of idempotent requests are forgotten once their keys are old enough."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from datetime import timedelta

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.adapters.postgres.pruning import prune_idempotency_keys, run_pruner
from services.appointments.adapters.system import new_uuid
from services.appointments.bootstrap import appointments_container
from services.appointments.domain.rules import Rules
from services.appointments.main import run_roles
from services.appointments.service_layer.handlers import Appointments, RequestContext
from services.appointments.service_layer.ports import IdempotencyRecord, StoredAnswer
from services.config import ConfigError, load_settings
from services.errors import IdempotencyKeyReused, TooEarly
from services.metrics import RELAY_BACKLOG
from tests.support.builders import principal, schedule_body
from tests.support.checks import wait_for
from tests.support.clock import ManualClock

DAY = timedelta(hours=24)


async def keep_answers(pool: asyncpg.Pool, count: int, age: timedelta) -> list[str]:
    store = PostgresEventStore(pool)
    keys = [f"key-{uuid.uuid4()}" for _ in range(count)]
    answer = StoredAnswer(fingerprint="f", status=200, body=b"{}", consistency_token="t")
    for key in keys:
        await store.save_answer(
            IdempotencyRecord(principal_id=uuid.uuid4(), key=key, answer=answer)
        )
    await pool.execute(
        "UPDATE idempotency_keys SET created_at = now() - $1::interval WHERE key = ANY($2)",
        age,
        keys,
    )
    return keys


async def kept(pool: asyncpg.Pool) -> set[str]:
    return {row["key"] for row in await pool.fetch("SELECT key FROM idempotency_keys")}


async def test_keys_older_than_the_ttl_are_pruned_in_batches_and_younger_ones_kept(
    pool: asyncpg.Pool,
) -> None:
    old = await keep_answers(pool, 11, DAY + timedelta(minutes=1))
    young = await keep_answers(pool, 4, DAY - timedelta(minutes=1))
    assert await prune_idempotency_keys(pool, DAY, batch=3) == 11
    assert await kept(pool) == set(young)
    assert await prune_idempotency_keys(pool, DAY, batch=3) == 0
    assert not set(old) & await kept(pool)


async def test_after_its_ttl_a_key_names_a_new_request(pool: asyncpg.Pool) -> None:
    clock = ManualClock()
    store = PostgresEventStore(pool)
    app = Appointments(store, store, clock, new_uuid, Rules())
    keyed = RequestContext(principal=principal("staff"), idempotency_key="book-once")
    first = await app.schedule(keyed, schedule_body(clock.now))
    with pytest.raises(IdempotencyKeyReused):  # kept: another body under it is refused
        await app.schedule(keyed, schedule_body(clock.now))
    await pool.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
    assert await prune_idempotency_keys(pool, DAY) == 1
    second = await app.schedule(keyed, schedule_body(clock.now))
    assert second.created and second.view.appointment_id != first.view.appointment_id


async def test_a_kept_refusal_is_pruned_with_its_key_like_an_answer(pool: asyncpg.Pool) -> None:
    clock = ManualClock()
    store = PostgresEventStore(pool)
    app = Appointments(store, store, clock, new_uuid, Rules())
    staff = principal("staff")
    booked = await app.schedule(
        RequestContext(principal=staff), schedule_body(clock.now, starts_in=timedelta(hours=3))
    )
    keyed = RequestContext(principal=staff, idempotency_key="start-once")
    with pytest.raises(TooEarly):
        await app.start(keyed, booked.view.appointment_id)
    clock.advance(hours=2, minutes=50)
    with pytest.raises(TooEarly):  # kept: answered again though the window is open now
        await app.start(keyed, booked.view.appointment_id)
    await pool.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'")
    assert await prune_idempotency_keys(pool, DAY) == 1
    started = await app.start(keyed, booked.view.appointment_id)
    assert started.appended and started.view.status == "started"


async def test_the_pruner_prunes_at_once_and_stops_when_told(pool: asyncpg.Pool) -> None:
    await keep_answers(pool, 3, DAY * 2)
    stop = asyncio.Event()
    pruner = asyncio.create_task(run_pruner(pool, stop, DAY, every=timedelta(hours=1)))
    for _ in range(200):
        if not await kept(pool):
            break
        await asyncio.sleep(0.05)
    assert await kept(pool) == set()
    stop.set()
    await asyncio.wait_for(pruner, 5)


def test_the_ttl_is_configured_in_hours_within_bounds() -> None:
    assert load_settings({}).idempotency_key_ttl_hours == 24
    assert load_settings({"CLINIC_IDEMPOTENCY_KEY_TTL_HOURS": "72"}).idempotency_key_ttl_hours == 72
    for wrong in ("0", "-5", "a day"):
        with pytest.raises(ConfigError, match="CLINIC_IDEMPOTENCY_KEY_TTL_HOURS"):
            load_settings({"CLINIC_IDEMPOTENCY_KEY_TTL_HOURS": wrong})


async def test_an_unmigrated_database_is_one_warning_per_try_not_a_traceback(
    empty_schema_pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    stop = asyncio.Event()

    class StopOnRecord(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            stop.set()  # after the first try's log line

    logger = logging.getLogger("services.appointments.adapters.postgres.pruning")
    handler = StopOnRecord()
    logger.addHandler(handler)
    try:
        await asyncio.wait_for(run_pruner(empty_schema_pool, stop, timedelta(hours=1)), 10)
    finally:
        logger.removeHandler(handler)
    (record,) = [r for r in caplog.records if "pruning" in r.getMessage()]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert 'relation "idempotency_keys" does not exist' in record.getMessage()


async def test_a_relay_role_that_never_reached_nats_prunes_and_measures_the_outbox(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """A relay process started while NATS is down (restarted during an outage) still does
    what needs only PostgreSQL: keys are pruned, and its gauges say what waits."""
    old = await keep_answers(pool, 3, DAY + timedelta(minutes=1))
    store = PostgresEventStore(pool)
    clock = ManualClock()
    app = Appointments(store, store, clock, new_uuid, Rules())
    for _ in range(4):  # events the relay cannot publish
        await app.schedule(RequestContext(principal=principal("staff")), schedule_body(clock.now))
    RELAY_BACKLOG.set(0)
    with socket.socket() as closed:  # a port nothing listens on: NATS unreachable
        closed.bind(("127.0.0.1", 0))
        nowhere = f"nats://127.0.0.1:{closed.getsockname()[1]}"
    settings = load_settings({"CLINIC_DATABASE_URL": database_url, "CLINIC_NATS_URL": nowhere})
    stop = asyncio.Event()
    async with appointments_container(settings, pool_size=2, wait_for_nats=False) as container:
        relay = asyncio.create_task(run_roles(container, ["relay"], stop))
        try:

            async def pruned_and_measured() -> bool:
                backlog = REGISTRY.get_sample_value("clinic_relay_backlog_events")
                return not set(old) & await kept(pool) and backlog == 4.0

            await wait_for(pruned_and_measured, 20, "pruning and the backlog gauge")
            assert not relay.done()
        finally:
            stop.set()
            await asyncio.wait_for(relay, 20)
