"""The outbox relay: publishes every committed event to JetStream, in commit order.

How it keeps its promises:

* **Nothing skipped.** It drains the ``outbox`` table (rows are deleted once JetStream
  acked them) instead of following a position: a transaction that commits late is
  simply invisible until it commits, then drained like any other row.
* **Nothing duplicated.** Each message carries ``Nats-Msg-Id`` = ``event_id``; a batch
  republished after a crash between ack and delete is dropped by the stream's duplicate
  window (consumers also skip versions they have seen).
* **One appointment in order.** One relay is active at a time: it holds a session-level
  ``pg_try_advisory_lock`` on the connection it drains with. The others stand by and
  retry the lock every second; when the active one dies, its session and lock go with it,
  and one that JetStream stopped acking steps down. Batches are published pipelined on
  one connection, so JetStream stores them in order.
* **Two batches in flight.** While a full batch's acks come back, the next one is
  fetched (rows after the last one fetched) and published; then the older batch's acked
  rows are deleted. That look-ahead returns rows only while the outbox holds nothing at or
  below its cursor but the rows in flight: once a transaction committed late below it,
  the relay settles what it has in flight and starts again from the oldest row, so a later
  event of the same appointment never overtakes it. Nor does one out of a refused publish:
  an appointment has at most one event unacked at a time (a batch ends before an event
  whose appointment has one in flight; the relay settles, then goes on from it). When a
  publish fails, every batch in flight is settled before anything else is sent (rows not
  acked are sent again, in order, after the pause). An event JetStream refuses for good
  (larger than the stream's ``max_msg_size``) holds back the later events of its
  appointment, with ``clinic_relay_lag_seconds`` growing.

Wake-up (measured, 2 cores, PostgreSQL 15, ``synchronous_commit=on``, 8 s per run):

=====================================  ==========  ==========
appends/s                               8 writers   32 writers
=====================================  ==========  ==========
no NOTIFY                               4000-5300   3500-5400
NOTIFY inside the append statement      2000-2350   1850-2200
coalesced NOTIFY after the commit       3100-3850   3900-4900
=====================================  ==========  ==========

``NOTIFY`` inside the append halves the append rate (its commit takes the cluster-wide
notify lock in ``PreCommit_Notify``, with p99 rising to 50-60 ms), so the append statement
does not notify. The relay polls the outbox every ``poll_interval`` (an index probe of an
almost empty table) and also ``LISTEN``\\s on :data:`CHANNEL`. An :class:`OutboxDoorbell`
is rung after appends: while a relay of the same process leads, it just sets that relay's
wake-up event; otherwise it sends one ``NOTIFY`` outside any append transaction,
coalescing every ring that arrives while one is in flight, which wakes the relay at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import msgspec
import nats.errors
from asyncpg.pool import PoolConnectionProxy
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck

from contracts.events import EventEnvelope, UnknownEventType, event_kind
from contracts.subjects import EVENTS_STREAM, event_subject
from services.appointments.adapters.nats import raise_if_cancelling
from services.appointments.adapters.nats.streams import (
    EventsStream,
    describe,
)
from services.appointments.adapters.postgres import outbox
from services.appointments.adapters.postgres.event_store import envelope_fields
from services.appointments.adapters.postgres.outbox import CHANNEL
from services.appointments.service_layer.ports import (
    AppendResult,
    IdempotencyRecord,
    NewEvent,
    ReadableEventStore,
    RecordedEvent,
)
from services.config import ConfigError
from services.metrics import (
    RELAY_BACKLOG,
    RELAY_DUPLICATES,
    RELAY_LAG_SECONDS,
    RELAY_METRICS,
    RELAY_PUBLISHED,
    exported,
)
from services.tracing import publish_headers
from services.waiting import idle

log = logging.getLogger(__name__)

_RETRY_MAX = 5.0
#: Outbox rows a relay reads (and publishes) at a time; the backlog gauge counts up to it.
BATCH_SIZE = 2000
#: How often a relay that does not lead (standing by, or without NATS) looks again.
STANDBY_SECONDS = 1.0
#: Leading this long counts as having worked (resets the retry delay) even if idle.
_LEAD_PROVEN_SECONDS = 30.0
#: Failed batches in a row after which the active relay gives up the lock.
_STEP_DOWN_AFTER = 5


class RelayStalled(Exception):
    """JetStream has not acked the active relay's batches for a while."""


def subject_of(row: asyncpg.Record) -> str:
    """The subject of an ``events`` row; a type this release does not know still gets one."""
    try:
        kind: str = event_kind(row["type"])
    except UnknownEventType:
        kind = re.sub(r"[^a-z0-9_-]", "", row["type"].removeprefix("Appointment").lower())
    return event_subject(row["clinic_id"], row["stream_id"], kind or "unknown")


class OutboxRelay:
    """Drains the outbox into the ``APPOINTMENTS`` stream while it holds the relay lock."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        nc: NATS,
        *,
        batch_size: int = BATCH_SIZE,
        in_flight: int = 2,
        poll_interval: float = 0.05,
        standby_interval: float = STANDBY_SECONDS,
        ack_timeout: float = 5.0,
        stream_replicas: int | None = None,
        doorbell: OutboxDoorbell | None = None,
    ) -> None:
        self._pool = pool
        self._nc = nc
        self._batch_size = batch_size
        self._in_flight = max(1, in_flight)
        self._js = self._jetstream()
        self._retired: list[JetStreamContext] = []  # replaced, reply inbox not yet dropped
        self._poll_interval = poll_interval
        self._standby_interval = standby_interval
        self._ack_timeout = ack_timeout
        self._stream_replicas = stream_replicas
        self._doorbell = doorbell
        exported(*RELAY_METRICS)
        self.published = 0
        """Events this relay published and deleted from the outbox (for tests and logs)."""

    def _jetstream(self) -> JetStreamContext:
        # Room for every publish of the batches in flight, and one batch more.
        pending = self._batch_size * (self._in_flight + 1)
        return self._nc.jetstream(publish_async_max_pending=pending)

    def _renew_jetstream(self) -> None:
        """Publish through a fresh context from now on (see :meth:`_publish`)."""
        self._retired.append(self._js)
        self._js = self._jetstream()

    async def _drop_retired(self) -> None:
        """Unsubscribe the reply inboxes of the replaced contexts: nats-py keeps each one
        (and its task) for the connection's life, so a relay through many reconnects would
        pile them up.

        Called before a publish: a refusal settles every batch in flight before anything
        else is sent, so no batch waits for an ack there any more; what still waits is the
        refused publishes' futures, which nats-py never hands back. nats-py offers no way
        to close a context: this reads its private ``_async_reply_prefix`` and
        ``_publish_async_futures`` and the connection's ``_subs``
        (``tests/integration/test_relay.py`` counts the inboxes).
        """
        retired, self._retired = self._retired, []
        for js in retired:
            for future in list(getattr(js, "_publish_async_futures", {}).values()):
                future.cancel()
            prefix = getattr(js, "_async_reply_prefix", None)
            if not prefix:
                continue
            subject = bytes(prefix).decode() + "*"
            for sub in list(getattr(self._nc, "_subs", {}).values()):
                if sub.subject == subject:
                    with contextlib.suppress(nats.errors.Error):
                        await sub.unsubscribe()

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set; outages of PostgreSQL or NATS are waited out."""
        delay = 0.1
        stream_ready = False
        standing_by = False  # said once, until this relay leads
        stream = EventsStream(self._stream_replicas)
        while not stop.is_set():
            raise_if_cancelling()
            try:
                if not stream_ready:
                    await stream.ensure(self._js)  # fresh after a refused publish
                    stream_ready = True
                async with self._pool.acquire() as conn:
                    if await outbox.try_lead(conn):
                        standing_by = False
                        log.info("relay active")
                        published, started = self.published, time.monotonic()
                        try:
                            await self._lead(conn, stop)
                        finally:
                            # Only leading that worked resets the delay: one that fails
                            # at once (no schema, say) must back off, not spin at 10 Hz.
                            proven = time.monotonic() - started >= _LEAD_PROVEN_SECONDS
                            if self.published > published or proven:
                                delay = 0.1
                            # Never leave the lock on a connection going back to a pool.
                            with contextlib.suppress(Exception):
                                await outbox.step_down(conn)
                        continue
                if not standing_by:
                    standing_by = True
                    log.info("relay standing by: another relay holds the lead")
                await self._observe_outbox()
                await idle(stop, self._standby_interval)
            except ConfigError:  # JetStream refused the stream for good: exit 2
                raise
            except Exception as exc:  # asyncpg, nats and OS errors share no base
                raise_if_cancelling()
                log.warning("relay interrupted, retrying in %.1fs: %s", delay, describe(exc))
                stream_ready = False  # it may be the stream that went away
                await self._observe_outbox()
                pause = delay
                if isinstance(exc, RelayStalled):
                    # Stay away for longer than a standby's poll, so that one takes over.
                    pause = max(delay, 2 * self._standby_interval)
                await idle(stop, pause)
                delay = min(delay * 2, _RETRY_MAX)

    async def _observe_outbox(self) -> None:
        await observe_outbox(self._pool, self._batch_size)

    async def _lead(self, conn: PoolConnectionProxy, stop: asyncio.Event) -> None:
        wake = asyncio.Event()

        def on_notify(*_: Any) -> None:
            wake.set()

        await conn.add_listener(CHANNEL, on_notify)
        if self._doorbell is not None:
            self._doorbell.attach(wake)
        in_flight: deque[_Batch] = deque()
        try:
            failures = 0
            cursor: int | None = None  # the last position fetched while batches are in flight
            while not stop.is_set():
                raise_if_cancelling()
                wake.clear()
                from_start = cursor is None
                if cursor is None:
                    rows = await outbox.oldest_unpublished(conn, self._batch_size)
                    _observe_backlog(len(rows), rows[0] if rows else None)
                else:
                    pending = sum(len(batch.rows) for batch in in_flight)
                    rows = await outbox.unpublished_after(conn, cursor, pending, self._batch_size)
                    if rows:  # the oldest waiting is the first row in flight
                        _observe_backlog(pending + len(rows), in_flight[0].rows[0])
                failed = 0
                rows, cut = _one_per_stream(rows, in_flight)
                if rows:
                    try:
                        in_flight.append(await self._publish(rows))
                    except nats.errors.Error as exc:
                        # Refused before any ack could come (NATS unreachable, say): a
                        # failed batch like an unacked one.
                        raise_if_cancelling()
                        log.warning("relay: %d publishes refused: %s", len(rows), describe(exc))
                        failed = len(rows)
                    cursor = rows[-1]["global_position"]
                more = len(rows) == self._batch_size and not cut
                # Keep up to ``in_flight`` batches out while full ones come; otherwise (or
                # once one fails) settle them all and start again from the oldest row.
                while in_flight and (len(in_flight) >= self._in_flight or not more or failed):
                    failed += await self._settle(conn, in_flight.popleft())
                if not in_flight:
                    cursor = None
                failures = failures + 1 if failed else 0
                if failures >= _STEP_DOWN_AFTER:
                    # Let a relay that reaches NATS take over (and re-check the stream).
                    raise RelayStalled(f"{failures} batches in a row not acked by JetStream")
                if failed:
                    await idle(stop, min(0.1 * 2**failures, _RETRY_MAX))
                elif from_start and not more:
                    await idle(stop, self._poll_interval, wake)
            while in_flight:  # stopping: what was sent is acked and deleted, not sent again
                await self._settle(conn, in_flight.popleft())
        finally:
            for batch in in_flight:
                batch.cancel()
            if self._doorbell is not None:
                self._doorbell.detach(wake)
            with contextlib.suppress(Exception):
                await conn.remove_listener(CHANNEL, on_notify)

    async def _publish(self, rows: list[asyncpg.Record]) -> _Batch:
        """Send every row of a batch pipelined (acks come back later).

        Not while the client is disconnected: it would buffer the messages, then refuse
        them, and ``publish_async`` loses a slot of its pending limit with every refusal
        (the slot is taken before the send, and the future is never handed back): lost
        slots add up until a publish waits for one forever. Should a publish be refused
        anyway (the connection lost mid-batch), the relay takes a fresh JetStream context,
        with a full limit, for the next batch. (``wait_stall`` would bound that wait too,
        but it wraps every publish in a task: it halved the relay's rate.)
        """
        if not self._nc.is_connected:
            raise nats.errors.ConnectionReconnectingError
        if self._retired:
            await self._drop_retired()
        batch = _Batch(rows)
        publish = self._js.publish_async
        try:
            for row in rows:
                batch.futures.append(
                    await publish(
                        subject_of(row), _payload(row), headers=_headers(row), stream=EVENTS_STREAM
                    )
                )
        except BaseException as exc:
            batch.cancel()
            if isinstance(exc, nats.errors.Error):
                self._renew_jetstream()
            raise
        return batch

    async def _settle(self, conn: PoolConnectionProxy, batch: _Batch) -> int:
        """Wait for a batch's acks and delete what was acked; how many were not."""
        rows, futures = batch.rows, batch.futures
        try:
            await asyncio.wait(futures, timeout=self._ack_timeout)
        finally:
            batch.cancel()  # no-op once done; frees the pending slot otherwise
        acked: list[int] = []
        duplicates = 0  # acked as already stored (its Nats-Msg-Id seen): sent again
        for row, future in zip(rows, futures, strict=True):
            if not future.cancelled() and future.exception() is None:
                acked.append(row["global_position"])
                duplicates += future.result().duplicate is True
        if acked:
            await outbox.mark_published(conn, acked)
            self.published += len(acked)
            RELAY_PUBLISHED.inc(len(acked))
            if duplicates:
                RELAY_DUPLICATES.inc(duplicates)
        failed = len(rows) - len(acked)
        if failed:
            errors = {
                describe(error)
                for f in futures
                if not f.cancelled() and (error := f.exception()) is not None
            }
            why = "; ".join(sorted(errors)) or "no acknowledgement in time"
            log.warning("relay: %d of %d publishes not acked: %s", failed, len(rows), why)
        return failed


def _one_per_stream(
    rows: list[asyncpg.Record], in_flight: deque[_Batch]
) -> tuple[list[asyncpg.Record], bool]:
    """``rows`` up to the first of an appointment that has an earlier event unacked (in
    flight, or before it in ``rows``), and whether any were cut. JetStream may refuse
    one publish and store the next (a leader election, an oversized message): an event
    of an appointment is sent only once the one before it was acked, so that the stream
    never holds them out of order. The rest go once what is in flight is settled."""
    busy = {row["stream_id"] for batch in in_flight for row in batch.rows}
    for index, row in enumerate(rows):
        if row["stream_id"] in busy:
            return rows[:index], True
        busy.add(row["stream_id"])
    return rows, False


class _Batch:
    """Rows published and their pending acks."""

    __slots__ = ("futures", "rows")

    def __init__(self, rows: list[asyncpg.Record]) -> None:
        self.rows = rows
        self.futures: list[asyncio.Future[PubAck]] = []

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()


#: :class:`~contracts.events.EventEnvelope` as published, its fields in its order, but
#: ``data`` passed through as stored (``jsonb`` text), not decoded and encoded again.
_WireEnvelope = msgspec.defstruct(
    "_WireEnvelope",
    [
        (f.name, msgspec.Raw) if f.name == "data" else (f.name, f.type, f.default)
        for f in msgspec.structs.fields(EventEnvelope)
    ],
    kw_only=True,
)

_encode = msgspec.json.Encoder().encode


def _payload(row: asyncpg.Record) -> bytes:
    """The JSON envelope of an ``events`` row, as ``envelope_from_row`` would encode it."""
    return _encode(_WireEnvelope(**envelope_fields(row), data=msgspec.Raw(row["data"])))


def _headers(row: asyncpg.Record) -> dict[str, str]:
    """``Nats-Msg-Id`` (de-duplication) and ``traceparent`` (of the publish span)."""
    return publish_headers(
        subject_of(row), row["event_id"], row.get("traceparent"), row["correlation_id"]
    )


def _observe_backlog(waiting: int, oldest: asyncpg.Record | None) -> None:
    """Relay lag: how many events wait (unacked and read; a full read means at least that
    many) and how old the oldest (``oldest``'s event) is."""
    RELAY_BACKLOG.set(waiting)
    if oldest is not None:
        age = (datetime.now(UTC) - oldest["occurred_at"]).total_seconds()
        RELAY_LAG_SECONDS.set(max(age, 0.0))
    else:
        RELAY_LAG_SECONDS.set(0.0)


async def observe_outbox(pool: asyncpg.Pool, batch_size: int = BATCH_SIZE) -> None:
    """Backlog and lag measured without leading (standing by, NATS unreachable, or not
    reached yet since the process started), so that the gauges still grow while no relay
    publishes, and a relay that stepped down reports what waits now rather than what it
    last read."""
    try:
        waiting, age = await outbox.backlog(pool, batch_size)
    except Exception as exc:  # PostgreSQL away too: the gauges keep their last values
        log.debug("relay could not measure the outbox: %s", describe(exc))
        return
    RELAY_BACKLOG.set(waiting)
    RELAY_LAG_SECONDS.set(age)


async def run_relay(
    pool: asyncpg.Pool,
    nc: NATS,
    stop: asyncio.Event,
    stream_replicas: int | None = None,
    doorbell: OutboxDoorbell | None = None,
) -> None:
    """The ``relay`` role of ``clinic appointments``: run an :class:`OutboxRelay`; appends
    ringing ``doorbell`` (this process's) wake it in-process."""
    await OutboxRelay(pool, nc, stream_replicas=stream_replicas, doorbell=doorbell).run(stop)


class OutboxDoorbell:
    """Wakes the relay right after an append, outside the append's transaction.

    While a relay of this process leads (it passes its wake-up event to :meth:`attach`), a ring
    sets that event: no round trip, no ``NOTIFY``. Otherwise :meth:`ring` sends one
    ``NOTIFY`` at a time, folding every ring during a send into one more send, for a relay
    in another process. It never waits; a lost ring only costs the relay's poll interval.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._rung = False
        self._sending: asyncio.Task[None] | None = None
        self._local: list[asyncio.Event] = []

    def attach(self, wake: asyncio.Event) -> None:
        """A relay of this process leads: ring ``wake`` instead of notifying."""
        self._local.append(wake)

    def detach(self, wake: asyncio.Event) -> None:
        """The relay that attached ``wake`` stopped leading."""
        with contextlib.suppress(ValueError):
            self._local.remove(wake)

    @property
    def relay_attached(self) -> bool:
        """Whether a relay of this process leads (and is rung in-process)."""
        return bool(self._local)

    def ring(self) -> None:
        """Ask for a wake-up of the relay (call after a successful append)."""
        if self._local:
            for wake in self._local:
                wake.set()
            return
        self._rung = True
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send())

    async def _send(self) -> None:
        while self._rung:
            self._rung = False
            try:
                await outbox.ring(self._pool)
            except Exception as exc:  # the relay polls anyway
                log.debug("outbox doorbell failed: %r", exc)
                return


class RingingEventStore:
    """An :class:`EventStore` that rings an :class:`OutboxDoorbell` after each append."""

    def __init__(self, inner: ReadableEventStore, doorbell: OutboxDoorbell) -> None:
        self._inner = inner
        self._doorbell = doorbell

    async def load(self, stream_id: UUID) -> list[RecordedEvent]:
        """The inner store's events of the stream."""
        return await self._inner.load(stream_id)

    async def load_envelopes(self, stream_id: UUID) -> list[EventEnvelope]:
        """The inner store's events of the stream, as stored."""
        return await self._inner.load_envelopes(stream_id)

    async def append(
        self,
        stream_id: UUID,
        expected_version: int,
        events: Sequence[NewEvent],
        idempotency: IdempotencyRecord | None = None,
    ) -> AppendResult:
        """Append through the inner store, then wake the relay."""
        result = await self._inner.append(stream_id, expected_version, events, idempotency)
        self._doorbell.ring()
        return result
