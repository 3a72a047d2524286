"""PostgreSQL going away under the notification service, or refusing writes for a while
(read-only after a failover): nothing is lost, nothing parked, nothing sent twice, and the
service recovers by itself. The service's own NATS connection down for longer than a
delivery's retries: its deliveries wait without spending them, and go out once it is back
(a reminder only while its visit is still to come). And the service itself down for days:
what it confirmed, it still announces the end of."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest

from contracts.subjects import EVENTS_STREAM
from services.embedded import EmbeddedNats
from services.notifications.domain import (
    Appointment,
    PlannedNotification,
    Timer,
    on_scheduled,
    on_timer,
)
from services.notifications.runtime import Tuning
from services.notifications.store import Channel, NotificationStore
from tests.integration.test_notifications_harness import (
    TEST_TUNING,
    Booking,
    Clinic,
    clinic,
    clinic_on_server,
    eventually,
    free_port,
    smtp,
)

__all__ = ["clinic", "clinic_on_server", "smtp"]  # fixtures

pytestmark = pytest.mark.fault

#: An ack wait of 3 s: the consumer's in-progress heartbeats (every second) have slack.
OUTAGE_TUNING = dataclasses.replace(TEST_TUNING, redelivery_backoff=(3.0,))


class TcpProxy:
    """Forwards a local port to a server (PostgreSQL, or NATS); ``cut`` drops every
    connection and refuses new ones until ``restore``: to the service, that server is
    down."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_database_outage_delays_notifications_but_loses_or_repeats_none(
    clinic: Clinic,
) -> None:
    dsn = urlsplit(clinic.settings.database_url or "")
    proxy = TcpProxy(dsn.hostname or "127.0.0.1", dsn.port or 5432)
    await proxy.restore()
    userinfo = dsn.netloc.rsplit("@", 1)[0] + "@" if "@" in dsn.netloc else ""
    via_proxy = urlunsplit(dsn._replace(netloc=f"{userinfo}127.0.0.1:{proxy.port}"))
    clinic.settings = msgspec.structs.replace(clinic.settings, database_url=via_proxy)
    booking = Booking()
    clinic.know(booking)

    async with clinic.running(tuning=OUTAGE_TUNING):
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
        await proxy.cut()
        await clinic.publish(booking.cancelled(clinic.clock(), booking.patient), booking.clinic_id)
        await eventually(lambda: _holds_the_second_event(clinic), what="the cancel delivered")
        await asyncio.sleep(3.5)  # longer than the ack wait: the consumer holds the event
        assert len(await clinic.pushes()) == 2
        await proxy.restore()
        # The consumer's and the delivery loop's own backoffs may take ~6 s of this.
        await eventually(lambda: _pushes(clinic, 4), 30, what="the cancellation notices")
        await clinic.wait_settled()

    await _assert_each_notice_once_and_no_redelivery(clinic)
    await proxy.cut()


async def test_a_read_only_database_holds_the_event_instead_of_spending_its_deliveries(
    clinic: Clinic, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failover the service may reconnect to a server still read-only. The consumer
    waits that out in place, as it does an outage; taking the refusal for a broken event
    would spend every delivery (the parking is refused too) and lose the event."""
    database = urlsplit(clinic.settings.require_database_url()).path.lstrip("/")
    booking = Booking()
    clinic.know(booking)

    async with clinic.running(tuning=OUTAGE_TUNING):
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
        await _reconnect_read_only(clinic, database, read_only=True)
        await eventually(
            lambda: _logged(caplog, "ReadOnlySQLTransactionError"),
            what="the service to be back, on a read-only database",
        )
        await clinic.publish(booking.cancelled(clinic.clock(), booking.patient), booking.clinic_id)
        await eventually(lambda: _holds_the_second_event(clinic), what="the cancel delivered")
        await asyncio.sleep(3.5)  # longer than the ack wait, and than max_deliver quick naks
        assert len(await clinic.pushes()) == 2
        info = await clinic.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
        assert info.delivered.consumer_seq == 2  # held in progress, never redelivered
        await _reconnect_read_only(clinic, database, read_only=False)
        await eventually(lambda: _pushes(clinic, 4), within=20, what="the cancellation notices")
        await clinic.wait_settled()

    await _assert_each_notice_once_and_no_redelivery(clinic)


# ------------------------------------------------------------- our NATS connection down

#: The production retries (8 attempts, 5 s doubling: ~11 min of backoff, under the 15 min cap).
NATS_OUTAGE_TUNING = dataclasses.replace(
    TEST_TUNING, retry_base=Tuning().retry_base, max_attempts=Tuning().max_attempts
)


def _appointment(booking: Booking) -> Appointment:
    return Appointment(
        appointment_id=booking.appointment_id,
        clinic_id=booking.clinic_id,
        patient_id=booking.patient_id,
        provider_id=booking.provider_id,
        starts_at=booking.starts_at,
        duration_minutes=booking.duration_minutes,
        timezone=booking.timezone,
        status="scheduled",
        scheduled_event_id=uuid.uuid4(),
    )


async def _stored(
    clinic: Clinic,
    appointment: Appointment,
    planned: Sequence[PlannedNotification],
    channels: Sequence[Channel],
) -> None:
    """Store ``planned``, each with a delivery due now per channel, as the consumer (or the
    scheduler) commits them: here, just as the service's NATS connection dropped."""
    async with NotificationStore(clinic.db).transaction() as tx:
        await tx.add_appointment(appointment)
        await tx.add_notifications(planned, channels, clinic.clock())


async def _nats_down(caplog: pytest.LogCaptureFixture) -> None:
    """Wait until the service saw its NATS connection drop."""
    await eventually(lambda: _logged(caplog, "nats disconnected"), what="the service to notice")


async def _outlast_the_retries(clinic: Clinic, tuning: Tuning) -> None:
    """Move the clock past every retry a delivery has, one backoff at a time, each time
    waiting until the delivery workers have looked for due deliveries again (and nothing
    is in flight): as many chances to spend every attempt as an outage that long gives."""
    for _ in range(tuning.max_attempts + 1):
        clinic.clock.now += tuning.retry_cap + timedelta(minutes=1)
        looked = clinic.clock.reads["DeliveryWorker.deliver_due"]

        async def workers_looked_again(since: int = looked) -> bool:
            if clinic.clock.reads["DeliveryWorker.deliver_due"] < since + 6:
                return False
            return not await clinic.deliveries("sending")

        await eventually(workers_looked_again, 60, what="the delivery workers to look again")


async def _service_link_via_proxy(clinic: Clinic) -> TcpProxy:
    """Route the service's own NATS connection through a proxy the test can cut; the
    test's connection, and the directory on it, stay on NATS."""
    nats_server = urlsplit(clinic.settings.nats_urls[0])
    proxy = TcpProxy(nats_server.hostname or "127.0.0.1", nats_server.port or 4222)
    await proxy.restore()
    via_proxy = [f"nats://127.0.0.1:{proxy.port}"]
    clinic.settings = msgspec.structs.replace(clinic.settings, nats_urls=via_proxy)
    return proxy


async def _all_settled(clinic: Clinic) -> bool:
    rows = await clinic.deliveries()
    return bool(rows) and all(r["status"] not in ("pending", "sending") for r in rows)


async def _outcomes(clinic: Clinic) -> list[tuple[str, str, str, int, str | None]]:
    """(kind, channel, status, attempts, why) of every delivery."""
    return sorted(
        (r["kind"], r["channel"], r["status"], r["attempts"], r["last_error"])
        for r in await clinic.deliveries()
    )


async def test_a_nats_outage_longer_than_the_retries_spends_no_attempt_of_a_push(
    clinic_on_server: tuple[Clinic, EmbeddedNats], caplog: pytest.LogCaptureFixture
) -> None:
    """NATS stopped for longer than a delivery's 8 attempts with their backoff, the workers
    running all along: the pushes wait, and go out on the first attempt once it is back;
    before, each poll spent an attempt and they were recorded ``failed`` for good."""
    clinic, server = clinic_on_server
    booking = Booking()
    async with clinic.running(tuning=NATS_OUTAGE_TUNING):
        await asyncio.to_thread(server.stop)
        await _nats_down(caplog)
        appointment = _appointment(booking)
        await _stored(clinic, appointment, on_scheduled(appointment), ["push"])
        await _outlast_the_retries(clinic, NATS_OUTAGE_TUNING)
        await asyncio.to_thread(server.start)
        await eventually(lambda: _all_settled(clinic), 30, what="the pushes to be recorded")
        await eventually(lambda: _connected(clinic), what="the test's own connection")
        await eventually(lambda: _pushes(clinic, 2), what="the pushes on the stream")

    assert await _outcomes(clinic) == [
        ("appointment-confirmed", "push", "sent", 1, None),
        ("appointment-confirmed", "push", "sent", 1, None),
    ]
    assert await _sent(clinic) == [
        ("appointment-confirmed", "patient"),
        ("appointment-confirmed", "provider"),
    ]
    assert "push delivery waits: the NATS connection is down" in caplog.text


async def test_an_email_waits_out_our_nats_connection_down_as_push_does(
    clinic: Clinic, caplog: pytest.LogCaptureFixture
) -> None:
    """Email asks the directory over NATS: with the service's own connection cut (the
    directory itself still answering on NATS), its deliveries wait too, then go out."""
    proxy = await _service_link_via_proxy(clinic)
    booking = Booking()
    clinic.know(booking)
    async with clinic.running(tuning=NATS_OUTAGE_TUNING):
        await proxy.cut()
        await _nats_down(caplog)
        appointment = _appointment(booking)
        await _stored(clinic, appointment, on_scheduled(appointment), ["push", "email"])
        await _outlast_the_retries(clinic, NATS_OUTAGE_TUNING)
        await proxy.restore()
        await eventually(lambda: _all_settled(clinic), 30, what="the deliveries to be recorded")
    await proxy.cut()

    assert await _outcomes(clinic) == [
        ("appointment-confirmed", channel, "sent", 1, None)
        for channel in ("email", "email", "push", "push")
    ]
    assert sorted(m["To"] for m in clinic.sink.messages) == sorted(
        booking.email_of(role) for role in ("patient", "provider")
    )
    assert len(await clinic.pushes()) == 2
    assert "email delivery waits: the NATS connection is down" in caplog.text


async def test_a_reminder_held_by_a_nats_outage_past_its_visit_is_skipped(
    clinic_on_server: tuple[Clinic, EmbeddedNats], caplog: pytest.LogCaptureFixture
) -> None:
    """ "Your visit can start now", due as NATS stopped, held until after the visit's end
    (nobody started it: no news came to outdate it): skipped on each channel, not sent
    hours late."""
    clinic, server = clinic_on_server
    booking = Booking()  # 14:00-14:30 UTC
    clinic.know(booking)
    clinic.clock.now = booking.starts_at - timedelta(minutes=15)  # its start window opens
    appointment = _appointment(booking)
    timer = Timer(
        appointment_id=booking.appointment_id,
        kind="visit-ready",
        cause_event_id=appointment.scheduled_event_id,
        due_at=clinic.clock(),
        expires_at=appointment.ends_at,
    )
    async with clinic.running(tuning=NATS_OUTAGE_TUNING):
        await asyncio.to_thread(server.stop)
        await _nats_down(caplog)
        planned = on_timer(appointment, timer, clinic.clock())
        await _stored(clinic, appointment, planned, ["push", "email"])
        await _outlast_the_retries(clinic, NATS_OUTAGE_TUNING)
        assert clinic.clock() > appointment.ends_at
        await asyncio.to_thread(server.start)
        await eventually(lambda: _all_settled(clinic), 30, what="the deliveries to be recorded")
        await eventually(lambda: _connected(clinic), what="the test's own connection")

    assert await _outcomes(clinic) == [
        ("visit-ready", channel, "skipped", 1, "after the visit's end")
        for channel in ("email", "push")
    ]
    assert await clinic.pushes() == []
    assert clinic.sink.messages == []


async def test_a_confirmation_held_by_a_nats_outage_past_the_visits_start_is_skipped(
    clinic_on_server: tuple[Clinic, EmbeddedNats], caplog: pytest.LogCaptureFixture
) -> None:
    """A booking's confirmations, stored 30 minutes before the visit as NATS stopped, held
    until the visit has begun: skipped on each channel, as the consumer would not confirm
    a booking it applied that late, not sent in the middle of the visit or after it."""
    clinic, server = clinic_on_server
    booking = Booking()  # 14:00-14:30 UTC
    clinic.know(booking)
    clinic.clock.now = booking.starts_at - timedelta(minutes=30)
    appointment = _appointment(booking)
    async with clinic.running(tuning=NATS_OUTAGE_TUNING):
        await asyncio.to_thread(server.stop)
        await _nats_down(caplog)
        await _stored(clinic, appointment, on_scheduled(appointment), ["push", "email"])
        await _outlast_the_retries(clinic, NATS_OUTAGE_TUNING)
        assert clinic.clock() > appointment.starts_at
        await asyncio.to_thread(server.start)
        await eventually(lambda: _all_settled(clinic), 30, what="the deliveries to be recorded")
        await eventually(lambda: _connected(clinic), what="the test's own connection")

    outcomes = await _outcomes(clinic)
    assert len(outcomes) == 4  # patient and provider, push and email
    assert {(kind, status, attempts, why) for kind, _, status, attempts, why in outcomes} == {
        ("appointment-confirmed", "skipped", 1, "after the visit began")
    }
    assert await clinic.pushes() == []
    assert clinic.sink.messages == []


@pytest.mark.parametrize(
    "back_at",
    [
        # 01:30 in Berlin: the visit's own day, its window not open yet.
        datetime(2030, 1, 15, 0, 30, tzinfo=UTC),
        # Its start window open (13:45), the visit not over (14:30).
        datetime(2030, 1, 15, 13, 50, tzinfo=UTC),
    ],
    ids=["past-midnight", "window-open"],
)
async def test_a_24h_reminder_held_by_a_nats_outage_says_today_or_gives_way(
    clinic: Clinic, caplog: pytest.LogCaptureFixture, back_at: datetime
) -> None:
    """The 24 h reminder fired ("Visit tomorrow") as the service's NATS connection
    dropped, held until ``back_at``: past midnight at the visit's place it goes out titled
    "Visit today"; once the start window is open it is skipped, as its timer would be
    dropped, and "your visit can start now" goes alone (not both, back to back)."""
    proxy = await _service_link_via_proxy(clinic)
    booking = Booking()  # Tue 15 Jan 2030 14:00-14:30 UTC, 15:00 in Berlin
    clinic.know(booking)
    appointment = _appointment(booking)
    clinic.clock.now = booking.starts_at - timedelta(hours=24)
    opens_at = booking.starts_at - timedelta(minutes=15)
    timers = {
        kind: Timer(
            appointment_id=booking.appointment_id,
            kind=kind,
            cause_event_id=appointment.scheduled_event_id,
            due_at=due_at,
            expires_at=expires_at,
        )
        for kind, due_at, expires_at in [
            ("reminder-24h", clinic.clock(), opens_at),
            ("visit-ready", opens_at, appointment.ends_at),
        ]
    }
    window_open = back_at >= opens_at
    async with clinic.running(tuning=NATS_OUTAGE_TUNING):
        await proxy.cut()
        await _nats_down(caplog)
        planned = on_timer(appointment, timers["reminder-24h"], clinic.clock())
        assert [p.title for p in planned] == ["Visit tomorrow"]
        await _stored(clinic, appointment, planned, ["push", "email"])
        clinic.clock.now = back_at
        if window_open:  # as the scheduler fires it once NATS answers
            ready = on_timer(appointment, timers["visit-ready"], clinic.clock())
            await _stored(clinic, appointment, ready, ["push", "email"])
        await proxy.restore()
        await eventually(lambda: _all_settled(clinic), 30, what="the deliveries to be recorded")
    await proxy.cut()

    patient_mail = [m["Subject"] for m in clinic.sink.to(booking.email_of("patient"))]
    pushed = [(p.kind, p.title) for p in await clinic.pushes()]
    if window_open:
        assert await _outcomes(clinic) == [
            ("reminder-24h", channel, "skipped", 1, "after the visit's start window opened")
            for channel in ("email", "push")
        ] + [("visit-ready", channel, "sent", 1, None) for channel in ("email", "push")]
        assert pushed == [("visit-ready", "Your visit can start now")]
        assert patient_mail == ["Your visit can start now"]
    else:
        assert await _outcomes(clinic) == [
            ("reminder-24h", channel, "sent", 1, None) for channel in ("email", "push")
        ]
        assert pushed == [("reminder-24h", "Visit today")]
        assert patient_mail == ["Visit today"]


async def _connected(clinic: Clinic) -> bool:
    return clinic.nc.is_connected


async def _assert_each_notice_once_and_no_redelivery(clinic: Clinic) -> None:
    """Both notices of the booking and of its cancellation went out, once each; nothing was
    parked and neither event was delivered twice (the held one stayed in progress)."""
    assert sorted(p.kind for p in await clinic.pushes()) == (
        ["appointment-cancelled"] * 2 + ["appointment-confirmed"] * 2
    )
    assert len(clinic.sink.messages) == 4
    assert await clinic.db.fetchval("SELECT count(*) FROM notification_parked_messages") == 0
    info = await clinic.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
    assert info.delivered.consumer_seq == 2  # held in progress, never redelivered


async def _reconnect_read_only(clinic: Clinic, database: str, *, read_only: bool) -> None:
    """Make ``database`` read-only (or writable again) for new sessions, and end every
    other session: the service reconnects to it, as to a standby or a promoted one."""
    conn = await asyncpg.connect(clinic.settings.require_database_url())
    try:
        await conn.execute("SET default_transaction_read_only = off")
        setting = (
            "SET default_transaction_read_only = on"
            if read_only
            else "RESET default_transaction_read_only"
        )
        await conn.execute(f'ALTER DATABASE "{database}" {setting}')
        await conn.execute(
            """SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
               WHERE datname = $1 AND pid <> pg_backend_pid()""",
            database,
        )
    finally:
        await conn.close()
    await clinic.db.expire_connections()


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return text in caplog.text


async def _pushes(clinic: Clinic, count: int) -> bool:
    return len(await clinic.pushes()) == count


async def _sent(clinic: Clinic) -> list[tuple[str, str]]:
    return sorted((p.kind, p.recipient_role) for p in await clinic.pushes())


async def test_a_cancellation_after_a_day_long_outage_reaches_those_told_of_the_booking(
    clinic: Clinic,
) -> None:
    booking = Booking()  # 77 h ahead of the clock
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
    # The service is down for two days; the patient cancelled in the first hour.
    cancelled = booking.cancelled(clinic.clock() + timedelta(hours=1), booking.patient)
    await clinic.publish(cancelled, booking.clinic_id)
    clinic.clock.advance(hours=50)
    async with clinic.running():
        await clinic.wait_settled()
    assert await _sent(clinic) == [
        ("appointment-cancelled", "patient"),
        ("appointment-cancelled", "provider"),
        ("appointment-confirmed", "patient"),
        ("appointment-confirmed", "provider"),
    ]


@pytest.mark.parametrize("cancelled_after_hours", [1, 77], ids=["days-old", "hours-old"])
async def test_a_cancellation_applied_after_the_visit_is_over_is_not_announced(
    clinic: Clinic, cancelled_after_hours: int
) -> None:
    booking = Booking()  # 77 h ahead of the clock, 30 min long
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
    at = clinic.clock() + timedelta(hours=cancelled_after_hours)
    await clinic.publish(booking.cancelled(at, booking.patient), booking.clinic_id)
    clinic.clock.advance(hours=80)  # the service was down until after the visit's end
    async with clinic.running():
        await clinic.wait_settled()
    assert await _sent(clinic) == [
        ("appointment-confirmed", "patient"),
        ("appointment-confirmed", "provider"),
    ]


async def test_a_first_start_on_a_long_history_announces_none_of_its_old_news(
    clinic: Clinic,
) -> None:
    # Bookings (one of them cancelled since) made days before the service first ran.
    kept, dropped = Booking(), Booking()
    for booking in (kept, dropped):
        clinic.know(booking)
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
    await clinic.publish(
        dropped.cancelled(clinic.clock() + timedelta(hours=1), dropped.patient), dropped.clinic_id
    )
    clinic.clock.advance(hours=48)
    async with clinic.running():
        await clinic.wait_settled()
        assert await _sent(clinic) == []
        # The booking kept still gets its reminder.
        clinic.clock.advance(hours=5)  # 24 h before the visit
        await eventually(
            lambda: _has_sent(clinic, ("reminder-24h", "patient")), what="the reminder"
        )
    assert await _sent(clinic) == [("reminder-24h", "patient")]


async def _has_sent(clinic: Clinic, what: tuple[str, str]) -> bool:
    return what in await _sent(clinic)


async def _holds_the_second_event(clinic: Clinic) -> bool:
    """The consumer was handed the second event and has not acknowledged it."""
    info = await clinic.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
    return info.delivered.consumer_seq == 2 and info.num_ack_pending == 1
