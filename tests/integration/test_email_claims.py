"""Email through a crash and a NATS outage, on real PostgreSQL, NATS and SMTP: a worker
killed before it handed its batch to the server loses none of it, one killed after the
hand-over never sends twice, a worker whose lease ran out does not send what another
worker now holds, and a directory that could not be asked (our own NATS connection down)
is asked again later instead of the email being skipped for good."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS

from services.embedded import EmbeddedNats
from services.notifications.delivery_store import DeliveryStore
from services.notifications.directory import Directory
from services.notifications.store import Channel, NotificationStore
from tests.integration.test_notifications_harness import (
    TEST_TUNING,
    Booking,
    Clinic,
    GatedDirectory,
    SmtpSink,
    clinic,
    email_worker,
    eventually,
    smtp,
)
from tests.support.builders import planned_notification
from tests.support.cluster import nats_cluster

__all__ = ["clinic", "smtp"]  # fixtures

NOW = datetime(2030, 1, 12, 9, 0, tzinfo=UTC)

#: The directory may take its time here: a worker killed while it waits is the point.
PATIENT_DIRECTORY = dataclasses.replace(TEST_TUNING, directory_timeout=30.0)


async def _emails(clinic: Clinic) -> list[asyncpg.Record]:
    return [d for d in await clinic.deliveries() if d["channel"] == "email"]


async def _kill(service: asyncio.Task[None]) -> None:
    service.cancel()  # the kill: nothing more is recorded
    with contextlib.suppress(asyncio.CancelledError):
        await service


# ------------------------------------------------------------------------ the crashes


async def test_emails_claimed_by_a_worker_killed_before_handing_them_over_all_go_out_once(
    clinic: Clinic,
) -> None:
    """The worker claims the batch, then waits for the directory; killed there, it handed
    nothing over, so after its lease every email goes out (they were all recorded failed
    "in doubt", and none sent, before the hand-over mark)."""
    bookings = [Booking() for _ in range(3)]  # 6 emails
    async with clinic.running(tuning=PATIENT_DIRECTORY) as service:
        for booking in bookings:  # the directory does not know them yet: it is slow
            await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)

        async def claimed() -> bool:  # the rest wait for the worker's next batch
            emails = await _emails(clinic)
            return len(emails) == 6 and any(e["status"] == "sending" for e in emails)

        await eventually(claimed, what="the emails claimed")
        await _kill(service)
    held = [e for e in await _emails(clinic) if e["status"] == "sending"]
    assert len(held) >= 2
    assert {e["sending_phase"] for e in held} == {"claimed"}

    for booking in bookings:
        clinic.know(booking)  # the directory answers now
    clinic.clock.advance(seconds=31)  # the dead worker's leases run out
    async with clinic.running():
        await clinic.wait_settled()
    assert len(clinic.sink.messages) == 6
    for booking in bookings:
        for role in ("patient", "provider"):
            assert len(clinic.sink.to(booking.email_of(role))) == 1
    assert {e["status"] for e in await _emails(clinic)} == {"sent"}


async def test_an_email_its_worker_was_killed_handing_over_is_never_sent_again(
    clinic: Clinic,
) -> None:
    """Killed while the server held the message at its recipient: the server may take it,
    so it is in doubt and not resent (at most once, as before the hand-over mark)."""
    booking = Booking()
    clinic.know(booking)
    patient = booking.email_of("patient")
    release = threading.Event()
    # Whatever the dead worker's thread then hears is recorded nowhere.
    clinic.sink.holds[patient] = (release, "451 4.3.0 Try again later")
    try:
        async with clinic.running() as service:
            await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)

            async def held() -> bool:
                return patient in clinic.sink.holding and len(clinic.sink.messages) == 1

            await eventually(held, what="the patient's email held at the server")
            phases = {e["recipient_id"]: e["sending_phase"] for e in await _emails(clinic)}
            assert phases[booking.patient_id] == "handing-over"
            await _kill(service)
    finally:
        release.set()

    clinic.clock.advance(seconds=31)  # the dead worker's lease runs out
    async with clinic.running():
        await clinic.wait_settled()
    assert clinic.sink.to(patient) == []  # not sent again (a resend is not held: it arrives)
    emails = {e["recipient_id"]: e for e in await _emails(clinic)}
    assert emails[booking.patient_id]["status"] == "failed"
    assert emails[booking.patient_id]["last_error"].startswith("in doubt")
    assert emails[booking.provider_id]["status"] == "sent"
    assert len(clinic.sink.to(booking.email_of("provider"))) == 1


# -------------------------------------------------------------------- a lease run out


@contextlib.asynccontextmanager
async def _outbox(
    database_url: str, count: int = 1, channel: Channel = "email"
) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database holding ``count`` pending emails (or ``channel``) due at NOW."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    try:
        async with NotificationStore(pool).transaction() as tx:
            await tx.add_notifications(
                [planned_notification("visit-ready") for _ in range(count)], [channel], NOW
            )
        yield pool
    finally:
        await pool.close()


def _refused_port() -> int:
    """A local port nothing listens on (a connection to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_a_worker_whose_lease_ran_out_does_not_send_what_another_now_holds(
    database_url: str, smtp: tuple[SmtpSink, str]
) -> None:
    sink, smtp_url = smtp
    async with _outbox(database_url) as pool:
        slow = GatedDirectory(asyncio.Event())
        first = asyncio.create_task(email_worker(pool, slow, smtp_url, NOW).deliver_due())
        await asyncio.wait_for(slow.waiting.wait(), 10)
        # The first worker's lease runs out in its lookup; a second one claims and sends.
        later = NOW + TEST_TUNING.lease + timedelta(seconds=1)
        assert await email_worker(pool, GatedDirectory(), smtp_url, later).deliver_due() == 1
        assert len(sink.messages) == 1
        assert slow.gate is not None
        slow.gate.set()
        assert await asyncio.wait_for(first, 10) == 1
        assert len(sink.messages) == 1  # its mark was refused: not a second copy
        row = await pool.fetchrow("SELECT status, attempts FROM notification_deliveries")
        assert row is not None and (row["status"], row["attempts"]) == ("sent", 2)


async def test_the_hand_over_mark_belongs_to_the_claim(database_url: str) -> None:
    async with _outbox(database_url) as pool:
        store = DeliveryStore(pool)
        (old,) = await store.claim("email", NOW, NOW + TEST_TUNING.lease, 10)
        later = NOW + TEST_TUNING.lease + timedelta(seconds=1)
        (new,) = await store.claim("email", later, later + TEST_TUNING.lease, 10)
        assert not new.in_doubt  # the first claim never marked it
        n = old.notification.notification_id
        assert not await store.handing_over(n, "email", old.attempts)
        assert await store.handing_over(n, "email", new.attempts)
        assert await store.handing_over(n, "email", new.attempts)  # again: still its own
        # Killed now: the next claim finds it in doubt, and so does every one after it
        # until it is recorded.
        for step in (2, 3):
            at = NOW + step * (TEST_TUNING.lease + timedelta(seconds=1))
            (again,) = await store.claim("email", at, at + TEST_TUNING.lease, 10)
            assert again.in_doubt


# ------------------------------------------------- every outcome belongs to the claim


async def _delivery(pool: asyncpg.Pool) -> tuple[str, str | None, int]:
    row = await pool.fetchrow("SELECT status, sending_phase, attempts FROM notification_deliveries")
    assert row is not None
    return row["status"], row["sending_phase"], row["attempts"]


async def test_a_lost_claim_writes_no_outcome_over_the_claim_that_holds_it(
    database_url: str,
) -> None:
    """The first claim's lease ran out and a second one marked the hand-over: the first
    worker's outcome, whatever it is, must not erase that mark (a retry would make the
    email look never handed over, and the next claim send it a second time)."""
    async with _outbox(database_url) as pool:
        store = DeliveryStore(pool)
        (old,) = await store.claim("email", NOW, NOW + TEST_TUNING.lease, 10)
        later = NOW + TEST_TUNING.lease + timedelta(seconds=1)
        (new,) = await store.claim("email", later, later + TEST_TUNING.lease, 10)
        n = new.notification.notification_id
        assert await store.handing_over(n, "email", new.attempts)
        held = ("sending", "handing-over", new.attempts)

        assert not await store.retry(n, "email", old.attempts, later, "connection refused")
        assert await _delivery(pool) == held
        assert not await store.finish(n, "email", old.attempts, "skipped", "no email address")
        assert not await store.finish(n, "email", old.attempts, "failed", "550 no such user")
        assert await _delivery(pool) == held
        assert await pool.fetchval("SELECT last_error FROM notification_deliveries") is None

        # The second worker dies now: the next claim finds the email in doubt.
        at = later + TEST_TUNING.lease + timedelta(seconds=1)
        (third,) = await store.claim("email", at, at + TEST_TUNING.lease, 10)
        assert third.in_doubt


async def test_a_send_that_outlived_its_claim_is_recorded_sent_all_the_same(
    database_url: str,
) -> None:
    """The first worker's email went out after its lease ran out, and after the next claim
    recorded it failed, in doubt: ``sent`` is a fact, recorded over that (and never twice)."""
    async with _outbox(database_url) as pool:
        store = DeliveryStore(pool)
        (old,) = await store.claim("email", NOW, NOW + TEST_TUNING.lease, 10)
        n = old.notification.notification_id
        assert await store.handing_over(n, "email", old.attempts)
        later = NOW + TEST_TUNING.lease + timedelta(seconds=1)
        (new,) = await store.claim("email", later, later + TEST_TUNING.lease, 10)
        assert new.in_doubt
        assert await store.finish(n, "email", new.attempts, "failed", "in doubt")
        assert await store.sent(n, "email", old.attempts, later)
        status, sent_at = await pool.fetchrow("SELECT status, sent_at FROM notification_deliveries")
        assert (status, sent_at) == ("sent", later)
        assert not await store.sent(n, "email", old.attempts, later)  # once
        at = later + TEST_TUNING.lease + timedelta(seconds=1)
        assert await store.claim("email", at, at + TEST_TUNING.lease, 10) == []


async def test_the_claim_that_holds_a_delivery_records_its_outcome_once(
    database_url: str,
) -> None:
    async with _outbox(database_url, count=3) as pool:
        store = DeliveryStore(pool)
        old = await store.claim("email", NOW, NOW + TEST_TUNING.lease, 10)
        later = NOW + TEST_TUNING.lease + timedelta(seconds=1)
        new = {
            c.notification.notification_id: c
            for c in await store.claim("email", later, later + TEST_TUNING.lease, 10)
        }
        sent, retried, failed = (c.notification.notification_id for c in old)
        for n in (sent, retried, failed):
            assert await store.handing_over(n, "email", new[n].attempts)
        assert await store.sent(sent, "email", new[sent].attempts, later)
        assert await store.retry(retried, "email", new[retried].attempts, later, "451")
        assert await store.finish(failed, "email", new[failed].attempts, "failed", "550")
        # Recorded: a write of either claim now changes nothing (but a send that went
        # out, a fact: see test_a_send_that_outlived_its_claim_is_recorded_sent_all_the_same).
        for claimed in old:
            n = claimed.notification.notification_id
            for claim in (claimed.attempts, new[n].attempts):
                assert not await store.finish(n, "email", claim, "skipped", "after the news")
                assert not await store.retry(n, "email", claim, later, "connection refused")
        assert not await store.sent(sent, "email", new[sent].attempts, later)  # once
        rows = {
            r["notification_id"]: (r["status"], r["sending_phase"], r["last_error"])
            for r in await pool.fetch("SELECT * FROM notification_deliveries")
        }
        assert rows == {
            sent: ("sent", "handing-over", None),
            retried: ("pending", None, "451"),
            failed: ("failed", "handing-over", "550"),
        }


async def test_a_lost_push_claim_writes_no_outcome_either(database_url: str) -> None:
    """Push claims count attempts as email's do: the first worker's outcome does not undo
    the second's claim, nor what the second recorded."""
    async with _outbox(database_url, channel="push") as pool:
        store = DeliveryStore(pool)
        (old,) = await store.claim("push", NOW, NOW + TEST_TUNING.lease, 10)
        later = NOW + TEST_TUNING.lease + timedelta(seconds=1)
        (new,) = await store.claim("push", later, later + TEST_TUNING.lease, 10)
        assert new.in_doubt  # a worker of the release before (it marked no push) may have sent it
        n = new.notification.notification_id
        assert not await store.retry(n, "push", old.attempts, later, "stream unavailable")
        assert not await store.finish(n, "push", old.attempts, "failed", "in doubt")
        assert await _delivery(pool) == ("sending", "claimed", new.attempts)
        assert await store.sent(n, "push", new.attempts, later)
        assert not await store.finish(n, "push", old.attempts, "skipped", "after the news")
        assert await _delivery(pool) == ("sent", "claimed", new.attempts)


async def test_a_worker_whose_lease_ran_out_leaves_the_hand_over_of_another_in_place(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The review's case: worker A waits on the directory past its lease; worker B claims
    the email and marks it as being handed over; A's SMTP connection then fails. A's retry
    must not reset the row to pending: B may have sent it, and once B dies, worker C would
    take it for never handed over and send it again."""
    async with _outbox(database_url) as pool:
        slow = GatedDirectory(asyncio.Event())
        nowhere = f"smtp://127.0.0.1:{_refused_port()}"
        first = asyncio.create_task(email_worker(pool, slow, nowhere, NOW).deliver_due())
        await asyncio.wait_for(slow.waiting.wait(), 10)
        store = DeliveryStore(pool)
        later = NOW + TEST_TUNING.lease + timedelta(seconds=1)
        (b,) = await store.claim("email", later, later + TEST_TUNING.lease, 10)
        assert await store.handing_over(b.notification.notification_id, "email", b.attempts)
        assert slow.gate is not None
        with caplog.at_level(logging.WARNING, logger="services.notifications.delivery"):
            slow.gate.set()
            assert await asyncio.wait_for(first, 10) == 1  # A's connection was refused
        assert await _delivery(pool) == ("sending", "handing-over", b.attempts)
        messages = [r.getMessage() for r in caplog.records]
        assert any("claim lost" in m for m in messages), messages
        assert not any("could not record" in m for m in messages), messages
        # B dies: C finds the email in doubt, records it failed and sends nothing.
        at = later + TEST_TUNING.lease + timedelta(seconds=1)
        assert await email_worker(pool, GatedDirectory(), nowhere, at).deliver_due() == 1
        row = await pool.fetchrow("SELECT status, last_error FROM notification_deliveries")
        assert row is not None and row["status"] == "failed"
        assert row["last_error"].startswith("in doubt")


async def test_a_worker_whose_lease_ran_out_does_not_skip_what_another_sent(
    database_url: str, smtp: tuple[SmtpSink, str]
) -> None:
    sink, smtp_url = smtp
    async with _outbox(database_url) as pool:
        slow = GatedDirectory(asyncio.Event(), known=False)  # "no email address known"
        first = asyncio.create_task(email_worker(pool, slow, smtp_url, NOW).deliver_due())
        await asyncio.wait_for(slow.waiting.wait(), 10)
        later = NOW + TEST_TUNING.lease + timedelta(seconds=1)
        assert await email_worker(pool, GatedDirectory(), smtp_url, later).deliver_due() == 1
        assert len(sink.messages) == 1
        assert slow.gate is not None
        slow.gate.set()
        assert await asyncio.wait_for(first, 10) == 1  # its skip comes too late
        row = await pool.fetchrow("SELECT status, last_error FROM notification_deliveries")
        assert row is not None and (row["status"], row["last_error"]) == ("sent", None)


# ------------------------------------------------------------------- a NATS outage

_RECONNECT: dict[str, Any] = {"max_reconnect_attempts": -1, "reconnect_time_wait": 0.1}


@contextlib.asynccontextmanager
async def ours_and_the_directorys(
    ours: dict[str, Any], directorys: dict[str, Any]
) -> AsyncIterator[tuple[NATS, NATS]]:
    """Our connection and the directory's (each ``nats.connect(**options)``), the directory
    answering every question with an address; both closed after."""
    nc = await nats.connect(**ours)
    directory_nc = await nats.connect(**directorys)
    try:

        async def answer(msg: Any) -> None:
            user = msg.subject.rsplit(".", 1)[1]
            await msg.respond(f'{{"email": "{user}@example.test"}}'.encode())

        await directory_nc.subscribe("directory.v1.contact.*", cb=answer)
        await directory_nc.flush()
        yield nc, directory_nc
    finally:
        for connection in (nc, directory_nc):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 2)


async def not_asked(pool: asyncpg.Pool, sink: SmtpSink, cause: str) -> asyncpg.Record:
    """The one delivery, after a claim whose question never reached the directory
    (``cause``): waiting for another attempt, not skipped for good, nothing sent."""
    row = await pool.fetchrow("SELECT * FROM notification_deliveries")
    assert row is not None
    assert row["status"] == "pending", row["last_error"]  # not skipped for good
    assert "directory not asked" in row["last_error"]
    assert cause in row["last_error"]
    assert sink.messages == []
    return row


async def sent_at_the_next_attempt(
    pool: asyncpg.Pool,
    directory: Directory,
    smtp: tuple[SmtpSink, str],
    held_back: asyncpg.Record,
) -> None:
    sink, smtp_url = smtp
    later = held_back["next_attempt_at"]
    assert await email_worker(pool, directory, smtp_url, later).deliver_due() == 1
    assert await pool.fetchval("SELECT status FROM notification_deliveries") == "sent"
    assert len(sink.messages) == 1


async def test_an_email_asked_of_the_directory_during_a_nats_outage_is_sent_after_it(
    database_url: str, nats_server: EmbeddedNats, smtp: tuple[SmtpSink, str]
) -> None:
    sink, smtp_url = smtp
    options = {"servers": nats_server.url, **_RECONNECT}
    async with (
        ours_and_the_directorys(options, options) as (nc, directory_nc),
        _outbox(database_url) as pool,
    ):
        await nats_server.astop()

        async def down() -> bool:
            return nc.is_reconnecting

        await eventually(down, what="our connection to notice the outage")
        directory = Directory(nc, TEST_TUNING.directory_timeout)
        assert await email_worker(pool, directory, smtp_url, NOW).deliver_due() == 1
        row = await not_asked(pool, sink, "NATS connection")
        await nats_server.astart()

        async def up() -> bool:
            return nc.is_connected and directory_nc.is_connected

        await eventually(up, within=15, what="both connections back")
        await directory_nc.flush()  # its subscription is the server's again
        await sent_at_the_next_attempt(pool, directory, smtp, row)


async def test_an_email_asked_of_the_directory_while_nats_hangs_is_sent_after_it(
    database_url: str, nats_server: EmbeddedNats, smtp: tuple[SmtpSink, str]
) -> None:
    """A server that hangs (frozen, or behind a partition that drops packets) leaves our
    connection looking up for the ~15 s its pings take to notice: a question asked then
    times out without ever reaching the directory. That says nothing of the directory, so
    the email is tried again later, not skipped for good (a 3 s hang of NATS in the chaos
    soak skipped ~100 confirmations and cancellations, every email claimed meanwhile)."""
    sink, smtp_url = smtp
    options = {"servers": nats_server.url, **_RECONNECT}
    async with (
        ours_and_the_directorys(options, options) as (nc, directory_nc),
        _outbox(database_url) as pool,
    ):
        # No silence window: the ping after the timeout alone tells the hang.
        directory = Directory(nc, 0.3, silence=0.0)
        nats_server.pause()
        try:
            assert nc.is_connected  # nothing noticed yet: the hang is silent
            assert await email_worker(pool, directory, smtp_url, NOW).deliver_due() == 1
        finally:
            nats_server.resume()
        row = await not_asked(pool, sink, "does not answer a ping")
        await directory_nc.flush()
        # The service's own timeout now: 0.3 s for a round trip just after the server
        # came back is a coin toss on a loaded machine (a miss records it skipped).
        directory = Directory(nc, TEST_TUNING.directory_timeout)
        await sent_at_the_next_attempt(pool, directory, smtp, row)


async def test_an_email_asked_before_the_directory_is_back_from_a_nats_restart_is_sent_after(
    database_url: str, nats_server: EmbeddedNats, smtp: tuple[SmtpSink, str]
) -> None:
    """After a NATS restart each client comes back on its own schedule: ours first, the
    directory's a moment later. "No directory listens" meanwhile says nothing of the
    directory, so the email is tried again later, not skipped for good (a restart of NATS
    in the chaos soak skipped 16 confirmations and cancellations, all claimed within 40 ms
    of our connection coming back)."""
    sink, smtp_url = smtp
    ours = {"servers": nats_server.url, **_RECONNECT}
    directorys = ours | {"reconnect_time_wait": 3.0}
    async with (
        ours_and_the_directorys(ours, directorys) as (nc, directory_nc),
        _outbox(database_url) as pool,
    ):
        # No silence window: the reconnect alone tells the directory may not be back.
        directory = Directory(nc, TEST_TUNING.directory_timeout, silence=0.0)
        await nats_server.astop()
        await nats_server.astart()

        async def ours_back_first() -> bool:
            return nc.is_connected and not directory_nc.is_connected

        await eventually(ours_back_first, within=15, what="our connection back first")
        assert await email_worker(pool, directory, smtp_url, NOW).deliver_due() == 1
        row = await not_asked(pool, sink, "reconnected moments ago")

        async def directory_back() -> bool:
            return directory_nc.is_connected

        await eventually(directory_back, within=15, what="the directory back")
        await directory_nc.flush()  # its subscription is the server's again
        await sent_at_the_next_attempt(pool, directory, smtp, row)


async def test_an_email_asked_while_the_directorys_nats_node_hangs_is_sent_after_it(
    database_url: str, smtp: tuple[SmtpSink, str]
) -> None:
    """On a cluster the directory may be connected to another node than ours. That node
    frozen (`SIGSTOP`, a partition dropping packets), the cluster still routes the question
    to it for as long as the directory's client takes to leave it (~20 s), while our
    connection and our own server are well: the question goes unanswered, which says
    nothing of the directory, so the email is tried again later, not skipped for good (a
    chaos soak on a 3-node cluster skipped 39 reminders and confirmations at one
    node's `SIGSTOP`)."""
    sink, smtp_url = smtp
    with nats_cluster("directory-node") as nodes:
        for node in nodes:
            node.start()
        options: dict[str, Any] = {"max_reconnect_attempts": -1, "reconnect_time_wait": 3.0}
        ours = {"servers": nodes[0].url, **options}
        directorys = {"servers": [nodes[1].url, nodes[2].url], "dont_randomize": True, **options}
        async with ours_and_the_directorys(ours, directorys) as (nc, _):

            async def routed() -> bool:  # the cluster knows where the directory listens
                with contextlib.suppress(nats.errors.Error):
                    await nc.request("directory.v1.contact.probe", b"", timeout=0.5)
                    return True
                return False

            await eventually(routed, within=30, what="the directory reachable from node 0")
            async with _outbox(database_url) as pool:
                directory = Directory(nc, 0.3)
                nodes[1].pause()
                try:
                    assert nc.is_connected
                    assert await email_worker(pool, directory, smtp_url, NOW).deliver_due() == 1
                finally:
                    nodes[1].resume()
                row = await not_asked(pool, sink, "silent for")
                await eventually(routed, within=30, what="the directory reachable again")
                await sent_at_the_next_attempt(pool, directory, smtp, row)


@pytest.mark.parametrize(
    "reply",
    [None, b"not json", b'{"email": "\xff@example.test"}', b"[" * 100_000],
    ids=["silent", "not-json", "invalid-utf8", "nested-deep"],
)
async def test_a_silent_or_unreadable_directory_on_a_connection_that_is_up_means_no_email(
    reply: bytes | None, database_url: str, nats_url: str, smtp: tuple[SmtpSink, str]
) -> None:
    """At once: an unreadable reply is no crash retried 8 times behind which the visit's
    later emails wait."""
    _, smtp_url = smtp
    nc = await nats.connect(nats_url)
    try:

        async def answer(msg: Any) -> None:
            if reply is not None:  # subscribed, never answers
                await msg.respond(reply)

        await nc.subscribe("directory.v1.contact.*", cb=answer)
        await nc.flush()
        async with _outbox(database_url) as pool:
            directory = Directory(nc, 0.3, silence=0.0)  # silent for long enough already
            assert await email_worker(pool, directory, smtp_url, NOW).deliver_due() == 1
            row = await pool.fetchrow("SELECT status, last_error FROM notification_deliveries")
            assert row is not None
            assert (row["status"], row["last_error"]) == ("skipped", "no email address known")
    finally:
        await nc.close()


# The resend window of a push runs from the first claim whose message may be stored.
_M = timedelta(minutes=1)


async def test_a_push_claimed_by_the_release_before_keeps_its_first_claim_time(
    database_url: str,
) -> None:
    # claim 1: a worker of the release before (no mark: phase 'claimed', looks the same),
    # publishes at ~NOW and dies. claim 2 (new release) resends within the window,
    # marks the hand-over and dies. claim 3 at NOW+70 min: the old copy may be stored at
    # NOW, so the window should run from NOW (past it: failed in doubt).
    async with _outbox(database_url, channel="push") as pool:
        store = DeliveryStore(pool)
        await store.claim("push", NOW, NOW + _M / 2, 10)
        t1 = NOW + 40 * _M
        (c2,) = await store.claim("push", t1, t1 + _M / 2, 10)
        assert c2.in_doubt and c2.previous_claimed_at == NOW
        assert await store.handing_over(c2.notification.notification_id, "push", c2.attempts)
        t2 = NOW + 70 * _M
        (c3,) = await store.claim("push", t2, t2 + _M / 2, 10)
        assert c3.in_doubt and c3.previous_claimed_at == NOW  # past the window: not resent


async def test_an_unanswered_push_abandoned_twice_keeps_its_first_claim_time(
    database_url: str,
) -> None:
    async with _outbox(database_url, channel="push") as pool:
        store = DeliveryStore(pool)
        (c1,) = await store.claim("push", NOW, NOW + _M / 2, 10)
        n = c1.notification.notification_id
        assert await store.handing_over(n, "push", c1.attempts)
        assert await store.retry(n, "push", c1.attempts, NOW + 5 * _M, "no answer", unanswered=True)
        t = NOW + 10 * _M
        (c2,) = await store.claim("push", t, t + _M / 2, 10)  # then dies before its mark
        assert c2.unanswered and c2.previous_claimed_at == NOW
        t = NOW + 20 * _M
        (c3,) = await store.claim("push", t, t + _M / 2, 10)
        assert c3.in_doubt and c3.previous_claimed_at == NOW
        assert await store.handing_over(n, "push", c3.attempts)  # publishes, dies (or no answer)
        t = NOW + 70 * _M
        (c4,) = await store.claim("push", t, t + _M / 2, 10)
        assert c4.in_doubt and c4.previous_claimed_at == NOW  # past the window: not resent
