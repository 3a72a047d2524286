"""The visits projector: a durable JetStream pull consumer that maintains the visits view.

Each fetched batch is applied in one PostgreSQL statement together with the
projection's checkpoint; messages are acked only after that commit. Re-applying is
harmless (an event at a version the row already has is skipped), so a crash between
commit and ack, a redelivery or a replay of the whole stream changes nothing.

Per message, after the commit:

* applied, already applied, or of an unknown type → ``ack``;
* early (an earlier event of the appointment has not arrived) → the appointment's row is
  folded from the event store, which holds every event before it, and the event acked;
  only an event the store lacks (or cannot be read for) is ``nak``-ed with a growing
  delay, parked once it was delivered :data:`PARK_AFTER` times;
* undecodable → parked in ``parked_messages`` and ``term``-inated, never blocking.

While PostgreSQL is down, or refuses for a reason that passes (read-only after a
failover, a full disk, a deadlock...), the batch is retried in place (keeping the
messages in progress), so an outage does not use up deliveries. Any other failure is
narrowed down to the messages that cause it, applied one by one; ``max_deliver`` only
bounds messages that keep failing, and they are parked before the server gives up on
them. A park that fails leaves its message for a later delivery, the others settled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

import asyncpg
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts.common import UNREADABLE_JSON
from contracts.events import EventEnvelope
from contracts.subjects import EVENTS_STREAM, EVENTS_SUBJECTS
from services.appointments.adapters.nats import raise_if_cancelling
from services.appointments.adapters.nats.streams import (
    EventsStream,
    describe,
)
from services.appointments.adapters.postgres.errors import passing_refusal
from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.adapters.postgres.visits import PostgresVisits, ViewUpdates
from services.appointments.service_layer.visits import Outcome, stored_row
from services.config import ConfigError
from services.errors import Unavailable
from services.metrics import (
    CONSUMER_REDELIVERIES,
    PROJECTOR_EVENTS,
    PROJECTOR_LAG_SECONDS,
    exported,
    zeroed,
)
from services.nats_client import delivered_for
from services.tracing import consuming
from services.waiting import idle

log = logging.getLogger(__name__)

CONSUMER: Final = "visits-projector"
#: The ``outcome`` label values of ``clinic_projector_events_total``.
OUTCOMES: Final = (*(outcome.value for outcome in Outcome), "parked", "failed")
#: Redelivery delays of unacked messages; the first is the ack wait.
BACKOFF: Final = (10.0, 20.0, 40.0, 60.0, 120.0)
MAX_DELIVER: Final = 20
#: Deliveries after which a message that still cannot be applied is parked.
PARK_AFTER: Final = 10
_RETRY_MAX = 5.0
#: Seconds before a message whose parking failed comes back.
_PARK_RETRY = 5.0


def consumer_config() -> ConsumerConfig:
    """The durable consumer of the visits projection (created or updated at start)."""
    return ConsumerConfig(
        durable_name=CONSUMER,
        description="Maintains the visits view in PostgreSQL.",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=BACKOFF[0],
        backoff=list(BACKOFF),
        max_deliver=MAX_DELIVER,
        max_ack_pending=1000,
        filter_subject=EVENTS_SUBJECTS,
    )


def _deliveries(msg: Msg) -> int:
    return int(msg.metadata.num_delivered or 1)


class VisitsProjector:
    """Runs the fetch loop of the visits projection."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        nc: NATS,
        *,
        batch_size: int = 256,
        fetch_timeout: float = 1.0,
        stream_replicas: int | None = None,
        check_after: float = 10.0,
        updates: ViewUpdates | None = None,
    ) -> None:
        self._js: JetStreamContext = nc.jetstream()
        self._visits = PostgresVisits(pool, projection=CONSUMER, updates=updates)
        self._store = PostgresEventStore(pool)
        self._batch_size = batch_size
        self._fetch_timeout = fetch_timeout
        self._stream_replicas = stream_replicas
        self._check_after = check_after
        """Idle seconds after which the consumer is checked to still exist."""
        self._lagging = False
        """The lag gauge reads above 0: while idle, look whether the consumer caught up."""

    async def run(self, stop: asyncio.Event) -> None:
        """Project until ``stop`` is set; outages of PostgreSQL or NATS are waited out."""
        zeroed(PROJECTOR_EVENTS, *((outcome,) for outcome in OUTCOMES))
        zeroed(CONSUMER_REDELIVERIES, ("projector",))
        exported(PROJECTOR_LAG_SECONDS)
        delay = 0.1
        stream = EventsStream(self._stream_replicas)
        while not stop.is_set():
            raise_if_cancelling()
            try:
                await stream.ensure(self._js)
                await self._js.add_consumer(EVENTS_STREAM, consumer_config())
                subscription = await self._js.pull_subscribe_bind(CONSUMER, EVENTS_STREAM)
                delay = 0.1
                try:
                    await self._consume(subscription, stop)
                finally:
                    await subscription.unsubscribe()
            except ConfigError:  # JetStream refused the stream for good: exit 2
                raise
            except Exception as exc:  # asyncpg, nats and OS errors share no base
                raise_if_cancelling()
                log.warning("projector interrupted, retrying in %.1fs: %s", delay, describe(exc))
                await idle(stop, delay)
                delay = min(delay * 2, _RETRY_MAX)

    async def _consume(
        self, subscription: JetStreamContext.PullSubscription, stop: asyncio.Event
    ) -> None:
        idle_since = time.monotonic()
        while not stop.is_set():
            raise_if_cancelling()
            try:
                msgs = await subscription.fetch(self._batch_size, timeout=self._fetch_timeout)
            except TimeoutError:
                if self._lagging or time.monotonic() - idle_since > self._check_after:
                    # A deleted consumer only times out (NATS 2.9): this raises
                    # NotFoundError then, and run() creates it again.
                    info = await self._js.consumer_info(EVENTS_STREAM, CONSUMER)
                    idle_since = time.monotonic()
                    if not info.num_pending and not info.num_ack_pending:
                        PROJECTOR_LAG_SECONDS.set(0.0)  # caught up: no lag to report
                        self._lagging = False
                continue
            await self.handle(delivered_for(msgs, EVENTS_STREAM, CONSUMER), stop)
            idle_since = time.monotonic()

    async def handle(self, msgs: Sequence[Msg], stop: asyncio.Event) -> None:
        """Apply one fetched batch, then settle every message (ack, nak or park)."""
        batch: list[tuple[Msg, EventEnvelope]] = []
        for msg in msgs:
            try:
                batch.append((msg, msgspec.json.decode(msg.data, type=EventEnvelope)))
            except UNREADABLE_JSON as exc:
                await self._park(msg, f"undecodable envelope: {exc}", stop)
        if not batch:
            return
        started = time.time_ns()
        outcomes = await self._apply(batch, stop)
        if outcomes is None:  # stopping while PostgreSQL is down: let another take them
            for msg, _ in batch:
                await msg.nak()
            return
        for (msg, envelope), outcome in zip(batch, outcomes, strict=True):
            with consuming("visits-projector apply", msg.headers, envelope.correlation_id, started):
                await self._settle(msg, envelope, outcome, stop)

    async def _apply(
        self, batch: list[tuple[Msg, EventEnvelope]], stop: asyncio.Event
    ) -> list[Outcome | None] | None:
        """Outcomes of the batch (None: failed alone); None when stopped before applying."""
        envelopes = [envelope for _, envelope in batch]
        sequence = max(msg.metadata.sequence.stream for msg, _ in batch)
        delay = 0.1
        while True:
            try:
                return list(await self._visits.apply(envelopes, sequence))
            except Exception as exc:
                if isinstance(exc, Unavailable) or passing_refusal(exc):
                    if stop.is_set():
                        return None
                    log.warning("projector: database unavailable, retrying: %r", exc)
                    for msg, _ in batch:
                        await msg.in_progress()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX)
                    continue
                if len(batch) == 1:
                    log.error("projector: cannot apply %s: %r", batch[0][0].subject, exc)
                    return [None]
                # Find the one that fails; the others go through.
                results: list[Outcome | None] = []
                for item in batch:
                    single = await self._apply([item], stop)
                    if single is None:
                        return None
                    results.extend(single)
                return results

    async def _settle(
        self, msg: Msg, envelope: EventEnvelope, outcome: Outcome | None, stop: asyncio.Event
    ) -> None:
        if outcome is Outcome.GAP and await self._folded_from_store(envelope):
            outcome = Outcome.APPLIED
        PROJECTOR_EVENTS.labels(outcome.value if outcome else "failed").inc()
        if _deliveries(msg) > 1:
            CONSUMER_REDELIVERIES.labels("projector").inc()
        # Whatever came of it: one that keeps failing shows its growing age.
        lag = max((datetime.now(UTC) - envelope.occurred_at).total_seconds(), 0.0)
        PROJECTOR_LAG_SECONDS.set(lag)
        self._lagging = lag > 0
        match outcome:
            case Outcome.APPLIED | Outcome.DUPLICATE | Outcome.SKIPPED:
                await msg.ack()
            case Outcome.POISON:
                await self._park(
                    msg, f"{envelope.type} v{envelope.schema_version} unreadable", stop
                )
            case Outcome.GAP | None if _deliveries(msg) >= PARK_AFTER:
                reason = "never applicable" if outcome is None else "earlier event never came"
                await self._park(msg, f"{reason} (stream_version {envelope.stream_version})", stop)
            case Outcome.GAP | None:
                await msg.nak(delay=min(0.5 * 2 ** (_deliveries(msg) - 1), 30.0))

    async def _folded_from_store(self, envelope: EventEnvelope) -> bool:
        """An event ahead of the view (one before it not delivered yet: the relay publishes
        a batch at once, so an event whose publish failed comes again after later ones of its
        stream): write the appointment's row folded from the event store, which holds every
        event up to this one, instead of waiting for the stream. Whether the row now holds
        it; if not (the store lacks it, or cannot be read), the event waits as before."""
        try:
            row = stored_row(await self._store.load_envelopes(envelope.stream_id))
            if row is None or row.version < envelope.stream_version:
                return False
            await self._visits.write_row_durably(row)  # the event is acked right after
        except Exception as exc:  # asyncpg and decoding errors share no base
            log.warning(
                "projector: could not fold %s from the event store: %r", envelope.stream_id, exc
            )
            return False
        log.info(
            "projector: %s v%d came before the events ahead of it; its row was folded from"
            " the event store (v%d)",
            envelope.stream_id,
            envelope.stream_version,
            row.version,
        )
        return True

    async def _park(self, msg: Msg, reason: str, stop: asyncio.Event) -> None:
        """Keep the message in ``parked_messages`` and terminate it on the stream. While
        PostgreSQL is away (or refuses for a reason that passes) it waits in place, like an
        apply, so that no delivery is spent; any other refusal leaves the message for a
        later delivery."""
        log.error("projector: parking message %s: %s", msg.subject, reason)
        delay = 0.1
        while True:
            try:
                await self._visits.park(
                    msg.metadata.sequence.stream, msg.subject, msg.data, reason, _deliveries(msg)
                )
            except (Unavailable, asyncpg.PostgresError) as exc:
                if stop.is_set() or not (isinstance(exc, Unavailable) or passing_refusal(exc)):
                    log.warning("projector: could not park %s, later: %r", msg.subject, exc)
                    await msg.nak(delay=_PARK_RETRY)
                    return
                log.warning("projector: could not park %s yet, retrying: %r", msg.subject, exc)
                await msg.in_progress()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            PROJECTOR_EVENTS.labels("parked").inc()
            await msg.term()
            return


async def run_projector(
    pool: asyncpg.Pool,
    nc: NATS,
    stop: asyncio.Event,
    stream_replicas: int | None = None,
    updates: ViewUpdates | None = None,
) -> None:
    """The ``projector`` role of ``clinic appointments``: run a :class:`VisitsProjector`;
    reads of this process waiting on ``updates`` are woken after each write."""
    await VisitsProjector(pool, nc, stream_replicas=stream_replicas, updates=updates).run(stop)
