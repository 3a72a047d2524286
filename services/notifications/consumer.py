"""The notification service's own durable pull consumer of the ``APPOINTMENTS`` stream.

An event is acknowledged only after its transaction has committed; a redelivery of a
committed event finds its processed mark and is acknowledged again. Unknown event types
are acknowledged and skipped; undecodable messages, and events that cannot apply after
``max_deliver`` deliveries, are parked in PostgreSQL and terminated on the stream, so
they never block it. While PostgreSQL is down the consumer holds its message (telling
JetStream it is still in progress) and retries, so an outage never uses up deliveries.
Before it fetches anything, the consumer records (once for the database) when the service
first started consuming: what happened since is news the service owes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Final, TypeVar
from uuid import UUID

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from contracts.events import Event, EventEnvelope, UnknownEventType, decode_event
from contracts.subjects import EVENTS_STREAM, event_subject, event_subject_appointment
from services.metrics import (
    CONSUMER_REDELIVERIES,
    NOTIFICATION_PARKED,
    NOTIFICATIONS_LAG_SECONDS,
    exported,
    zeroed,
)
from services.nats_client import delivered_for
from services.notifications.handlers import EventHandler, Outcome
from services.notifications.runtime import Hooks, Tuning
from services.notifications.store import NotificationStore
from services.pg_errors import is_transient, schema_behind
from services.tracing import consuming
from services.waiting import idle

log = logging.getLogger(__name__)

T = TypeVar("T")

_envelope_decoder: Final = msgspec.json.Decoder(EventEnvelope)


class _Stopping(Exception):
    """The service stops while waiting for PostgreSQL: leave the message unacknowledged."""


def consumer_config(tuning: Tuning) -> ConsumerConfig:
    """The durable consumer: explicit acks, redelivery backoff, bounded deliveries."""
    return ConsumerConfig(
        name=tuning.consumer_name,
        durable_name=tuning.consumer_name,
        description="Notification service: confirmations, cancellations, reminders.",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        # JetStream takes the first backoff step as the ack wait; say so explicitly.
        ack_wait=tuning.redelivery_backoff[0],
        backoff=list(tuning.redelivery_backoff),
        max_deliver=tuning.max_deliver,
        max_ack_pending=tuning.max_ack_pending,
    )


async def ensure_consumer(js: JetStreamContext, tuning: Tuning) -> ConsumerInfo:
    """Create the durable consumer, or update it to the configuration in code."""
    return await js.add_consumer(EVENTS_STREAM, consumer_config(tuning))


#: JetStream's code of "no message found" (a 404 like "stream not found", 10059).
_NO_MESSAGE: Final = 10037

#: The events that end an appointment: its reminders are never sent after either.
_ENDING_KINDS: Final = ("cancelled", "started")


class JetStreamEndings:
    """Whether the ``APPOINTMENTS`` stream holds a cancel or a start of an appointment,
    asked of JetStream (the reminder scheduler's
    :class:`~services.notifications.reminders.Endings`).

    Asks for the last message on each exact subject of those events (no wildcards: every
    JetStream version answers such a question), whether or not the consumer has processed
    it. "No message found" is a no; anything else (NATS unreachable, the stream missing)
    raises."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def ended(self, clinic_id: UUID, appointment_id: UUID) -> bool:
        """Whether a cancel or a start of the appointment is on the stream."""
        found = await asyncio.gather(
            *(
                self._on_stream(event_subject(clinic_id, appointment_id, kind))
                for kind in _ENDING_KINDS
            ),
            return_exceptions=True,
        )
        for answer in found:
            if isinstance(answer, BaseException):
                raise answer
        return any(found)

    async def _on_stream(self, subject: str) -> bool:
        try:
            await self._js.get_last_msg(EVENTS_STREAM, subject)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _NO_MESSAGE:
                return False
            raise
        return True


class EventConsumer:
    """Fetches appointment events and applies them, one at a time, in stream order."""

    def __init__(
        self,
        js: JetStreamContext,
        handler: EventHandler,
        store: NotificationStore,
        tuning: Tuning,
        hooks: Hooks,
        on_new_work: Callable[[], None],
    ) -> None:
        self._js = js
        self._handler = handler
        self._store = store
        self._tuning = tuning
        self._hooks = hooks
        self._on_new_work = on_new_work
        self._in_flight: dict[int, datetime] = {}  # events being handled: their occurrence
        self._last_lag = 0.0  # of the last event handled (0 once caught up)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; messages fetched but not handled are handed back.
        Fetches nothing before the service's first start is recorded (:meth:`_begin`)."""
        zeroed(CONSUMER_REDELIVERIES, ("notifications",))
        exported(NOTIFICATION_PARKED)
        exported(NOTIFICATIONS_LAG_SECONDS)
        NOTIFICATIONS_LAG_SECONDS.set_function(self._lag)
        if not await self._begin(stop):
            return
        sub = await self._js.pull_subscribe_bind(
            durable=self._tuning.consumer_name, stream=EVENTS_STREAM
        )
        checked = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    messages = await sub.fetch(
                        self._tuning.fetch_batch, timeout=self._tuning.fetch_timeout
                    )
                except TimeoutError:  # nothing to fetch (nats-py raises either kind)
                    if self._last_lag > 0:
                        await self._caught_up()
                    # A deleted consumer looks just like an idle one to some servers.
                    if time.monotonic() - checked > self._tuning.consumer_check_interval:
                        checked = time.monotonic()
                        await _quietly(ensure_consumer(self._js, self._tuning))
                    continue
                except Exception as exc:  # NATS reconnecting, consumer deleted…
                    log.warning("fetching events failed: %r", exc)
                    await idle(stop, 1.0)
                    await _quietly(ensure_consumer(self._js, self._tuning))
                    continue
                own = delivered_for(messages, EVENTS_STREAM, self._tuning.consumer_name)
                await self._handle_fetched(own, stop)
        finally:
            await _quietly(sub.unsubscribe())

    async def _handle_fetched(self, messages: list[Msg], stop: asyncio.Event) -> None:
        """Handle a fetched batch: the events of up to ``handle_concurrency`` appointments
        at once, each appointment's one after another in stream order (its events apply
        in order; those of different appointments touch different rows). Once ``stop`` is
        set, what is not handled yet is handed back."""
        by_appointment: dict[str, list[Msg]] = {}
        for msg in messages:
            # A subject of another shape stands for itself.
            appointment = event_subject_appointment(msg.subject) or msg.subject
            by_appointment.setdefault(appointment, []).append(msg)
        turns = asyncio.Semaphore(self._tuning.handle_concurrency)

        async def handle_in_order(msgs: list[Msg]) -> None:
            async with turns:
                for index, msg in enumerate(msgs):
                    if stop.is_set():
                        for unhandled in msgs[index:]:
                            await _quietly(unhandled.nak())
                        return
                    await self.handle(msg, stop)

        tasks = [asyncio.ensure_future(handle_in_order(msgs)) for msgs in by_appointment.values()]
        try:
            await asyncio.gather(*tasks)
        finally:  # one failed beyond handling (or the consumer is cancelled): the rest too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _lag(self) -> float:
        """The age of the oldest event being handled (held by a database outage, it grows),
        else that of the last one handled; 0 once caught up."""
        if not self._in_flight:
            return self._last_lag
        oldest = min(self._in_flight.values())
        return max((datetime.now(UTC) - oldest).total_seconds(), 0.0)

    async def _caught_up(self) -> None:
        """Nothing fetched: once the consumer has nothing pending (this instance's or
        another's), there is no lag to report. Not asked while NATS is away (the gauge
        keeps its value; a warning every idle fetch would say nothing more)."""
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, self._tuning.consumer_name)
        except (nats.errors.Error, OSError, TimeoutError):
            return
        if not info.num_pending and not info.num_ack_pending:
            self._last_lag = 0.0

    async def _begin(self, stop: asyncio.Event) -> bool:
        """Record, once for the database, when the service first started consuming: the
        line between the history a first start inherits and the news it owes (see
        :mod:`~services.notifications.handlers`). Waits out PostgreSQL down, or not migrated
        yet (the events wait on the stream meanwhile; the readiness probe says so too: a
        warning, not an error, as the migrate Job may run alongside a new pod); False if
        ``stop`` is set first."""
        delay = 0.2
        while not stop.is_set():
            try:
                first_start = await self._handler.begin()
            except Exception as exc:
                if is_transient(exc):
                    log.warning("database unavailable, retrying in %.1fs: %r", delay, exc)
                elif schema_behind(exc):
                    log.warning(
                        "database not migrated yet (run clinic migrate), retrying in %.1fs: %s",
                        delay,
                        exc,
                    )
                else:
                    log.exception("recording the first start failed, retrying in %.1fs", delay)
            else:
                log.info("consuming", extra={"first_start": first_start.isoformat()})
                return True
            await idle(stop, delay)
            delay = min(delay * 2, 5.0)
        return False

    async def handle(self, msg: Msg, stop: asyncio.Event) -> None:
        """Apply one message and acknowledge, retry, skip or park it."""
        try:
            envelope = _envelope_decoder.decode(msg.data)
            event = decode_event(envelope.type, envelope.schema_version, envelope.data)
        except UnknownEventType:
            log.info("unknown event type skipped", extra={"subject": msg.subject})
            await _quietly(msg.ack())
            return
        except Exception as exc:  # anything a malformed message makes the decoders raise
            await self._park(msg, f"undecodable: {exc}", stop)
            return
        with consuming("notifications handle", msg.headers, envelope.correlation_id):
            await self._handle_event(msg, envelope, event, stop)

    async def _handle_event(
        self, msg: Msg, envelope: EventEnvelope, event: Event, stop: asyncio.Event
    ) -> None:
        sequence = msg.metadata.sequence.stream
        # Whatever comes of it (one that keeps failing shows its growing age), and while
        # it is held (a database outage: the backlog behind it grows).
        self._in_flight[sequence] = envelope.occurred_at
        try:
            await self._apply_event(msg, envelope, event, sequence, stop)
        finally:
            self._in_flight.pop(sequence, None)
            self._last_lag = max((datetime.now(UTC) - envelope.occurred_at).total_seconds(), 0.0)

    async def _apply_event(
        self, msg: Msg, envelope: EventEnvelope, event: Event, sequence: int, stop: asyncio.Event
    ) -> None:
        if msg.metadata.num_delivered > 1:
            CONSUMER_REDELIVERIES.labels("notifications").inc()
        try:
            outcome = await self._with_database(
                lambda: self._handler.apply(envelope, event, sequence), msg, stop
            )
        except _Stopping:
            await _quietly(msg.nak())  # for another instance to take at once
            return
        except Exception as exc:
            log.exception("applying an event failed", extra={"event_id": str(envelope.event_id)})
            await self._retry_or_park(msg, f"failed: {exc!r}", stop)
            return
        if outcome is Outcome.NOT_READY:
            await self._retry_or_park(
                msg, "appointment unknown: its scheduling never arrived", stop
            )
            return
        await self._hooks.after_commit(envelope.event_id)
        await _quietly(msg.ack())
        if outcome is Outcome.APPLIED:
            self._on_new_work()

    async def _retry_or_park(self, msg: Msg, reason: str, stop: asyncio.Event) -> None:
        if msg.metadata.num_delivered >= self._tuning.max_deliver:
            await self._park(msg, reason, stop)
        else:
            await _quietly(msg.nak(delay=self._tuning.not_ready_delay))

    async def _park(self, msg: Msg, reason: str, stop: asyncio.Event) -> None:
        meta = msg.metadata
        log.error(
            "message parked",
            extra={
                "stream_sequence": meta.sequence.stream,
                "subject": msg.subject,
                "reason": reason,
            },
        )
        try:
            await self._with_database(
                lambda: self._store.park(
                    meta.sequence.stream, msg.subject, msg.data, reason, meta.num_delivered
                ),
                msg,
                stop,
            )
        except _Stopping:
            await _quietly(msg.nak())
            return
        except Exception:
            log.exception("parking a message failed")
            await _quietly(msg.nak(delay=self._tuning.not_ready_delay))
            return
        NOTIFICATION_PARKED.inc()
        await _quietly(msg.term())

    async def _with_database(
        self, operation: Callable[[], Awaitable[T]], msg: Msg, stop: asyncio.Event
    ) -> T:
        """Run ``operation``, retrying while PostgreSQL is unavailable, and telling JetStream
        the message is in progress more often than its ack wait, so it is not redelivered."""
        heartbeat = self._tuning.redelivery_backoff[0] / 3
        delay = 0.2
        while True:
            try:
                return await operation()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("database unavailable, retrying in %.1fs: %r", delay, exc)
            waited = 0.0
            while waited < delay:
                await _quietly(msg.in_progress())
                step = min(delay - waited, heartbeat)
                if await idle(stop, step):
                    raise _Stopping
                waited += step
            delay = min(delay * 2, 5.0)


async def _quietly(operation: Awaitable[object]) -> None:
    """Acks, naks and unsubscribes that fail (NATS gone) are redone by redelivery."""
    try:
        await operation
    except (nats.errors.Error, OSError) as exc:
        log.warning("nats operation failed: %r", exc)
