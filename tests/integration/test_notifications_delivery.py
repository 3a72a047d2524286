"""Each kind of notification reaches the right people, by push and by email, with the
time as their clock shows it; email depends on the directory and never holds up push."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import nats
import pytest
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from contracts.common import Actor
from contracts.subjects import NOTIFICATIONS_STREAM
from services.notifications import email as email_channel
from services.notifications.channels import notifications_stream_config
from services.notifications.directory import Directory
from services.notifications.runtime import Tuning
from tests.integration.test_notifications_harness import (
    TEST_TUNING,
    Booking,
    Clinic,
    clinic,
    eventually,
    smtp,
)

__all__ = ["clinic", "smtp"]  # fixtures


async def test_every_kind_reaches_the_right_recipients_with_the_local_time(clinic: Clinic) -> None:
    booking = Booking(timezone="America/New_York")  # 14:00 UTC is 09:00 EST
    clinic.know(booking)
    booked_at = clinic.clock()
    sent_at = {
        "appointment-confirmed": booked_at,
        "reminder-24h": datetime(2030, 1, 14, 14, 0, tzinfo=UTC),  # 24 h before
        "visit-ready": datetime(2030, 1, 15, 13, 45, tzinfo=UTC),  # the window opens
    }
    scheduled = booking.scheduled(booked_at)
    async with clinic.running():
        await clinic.publish(scheduled, booking.clinic_id)
        await clinic.wait_settled()
        clinic.clock.now = sent_at["reminder-24h"]
        await eventually(lambda: _count(clinic, "reminder-24h", 1), what="the reminder")
        await clinic.wait_settled()  # its email too: claimed once the window opens, skipped
        clinic.clock.now = sent_at["visit-ready"]
        await eventually(lambda: _count(clinic, "visit-ready", 1), what="visit-ready")
        await clinic.wait_settled()

    pushes = await clinic.pushes()
    for message, push in zip(await clinic.messages(), pushes, strict=True):
        assert message.subject == f"notifications.v1.sent.{push.kind}"
        assert msgspec.json.decode(message.data or b"") == {  # the published body, every field
            "notification_id": str(push.notification_id),
            "kind": push.kind,
            "recipient_id": str(push.recipient_id),
            "recipient_role": push.recipient_role,
            "appointment_id": str(booking.appointment_id),
            "clinic_id": str(booking.clinic_id),
            "cause_event_id": str(scheduled.event_id),  # reminders too: the booking's news
            "title": push.title,
            "body": push.body,
            "sent_at": sent_at[push.kind].isoformat().replace("+00:00", "Z"),
        }
    assert len({p.notification_id for p in pushes}) == len(pushes)
    # Each address asked for names the clinic, for the directory to answer none for a user
    # not of it (a booking names its provider by id alone).
    assert clinic.asked and {c for _, c in clinic.asked} == {str(booking.clinic_id)}
    sent = sorted((p.kind, p.recipient_role, p.recipient_id) for p in pushes)
    assert sent == sorted(
        [
            ("appointment-confirmed", "patient", booking.patient_id),
            ("appointment-confirmed", "provider", booking.provider_id),
            ("reminder-24h", "patient", booking.patient_id),
            ("visit-ready", "patient", booking.patient_id),
        ]
    )
    for push in pushes:
        assert "Tue 15 Jan 2030 at 09:00 EST" in push.body
        assert push.appointment_id == booking.appointment_id
        assert push.clinic_id == booking.clinic_id
        assert "private" not in push.body
    patient_mail = clinic.sink.to(booking.email_of("patient"))
    assert sorted(m["Subject"] for m in patient_mail) == [
        "Visit confirmed",
        "Visit tomorrow",
        "Your visit can start now",
    ]
    assert all("09:00 EST" in m.get_content() for m in patient_mail)
    assert [m["Subject"] for m in clinic.sink.to(booking.email_of("provider"))] == [
        "New visit booked"
    ]


@pytest.mark.parametrize(
    ("by", "told"),
    [
        (
            "patient",
            {
                "patient": "You cancelled your video visit",
                "provider": "The patient cancelled the video visit",
            },
        ),
        ("provider", {"patient": "Your provider cancelled your video visit"}),
        (
            "staff",
            {
                "patient": "The clinic cancelled your video visit",
                "provider": "The clinic cancelled the video visit",
            },
        ),
    ],
)
async def test_a_cancellation_tells_who_did_not_cancel_and_confirms_a_patients_own(
    clinic: Clinic, by: str, told: dict[str, str]
) -> None:
    booking = Booking()
    clinic.know(booking)
    actor = {
        "patient": booking.patient,
        "provider": booking.provider,
        "staff": Actor(id=uuid.uuid4(), role="staff"),
    }[by]
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        cancelled = booking.cancelled(clinic.clock(), actor)
        await clinic.publish(cancelled, booking.clinic_id)
        await clinic.wait_settled()

    notices = [p for p in await clinic.pushes() if p.kind == "appointment-cancelled"]
    assert sorted(p.recipient_role for p in notices) == sorted(told)
    for notice in notices:
        assert notice.cause_event_id == cancelled.event_id
        assert notice.title == "Visit cancelled"
        assert notice.body == f"{told[notice.recipient_role]} of Tue 15 Jan 2030 at 15:00 CET."
    for role in told:
        assert [m["Subject"] for m in clinic.sink.to(booking.email_of(role))] == [
            "New visit booked" if role == "provider" else "Visit confirmed",
            "Visit cancelled",
        ]


async def test_a_directory_reply_with_an_address_leads_to_a_real_email(clinic: Clinic) -> None:
    booking = Booking()
    clinic.contacts[booking.patient_id] = {"email": "pat@example.test", "locale": None}
    clinic.contacts[booking.provider_id] = {"email": None, "locale": "de"}
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()

    (mail,) = clinic.sink.messages
    assert mail["To"] == "pat@example.test"
    assert mail["From"] == "clinic@example.test"
    assert mail["Subject"] == "Visit confirmed"
    patient_push = next(p for p in await clinic.pushes() if p.recipient_role == "patient")
    assert mail["X-Clinic-Notification-Id"] == str(patient_push.notification_id)
    emails = {r["recipient_id"]: r for r in await clinic.deliveries() if r["channel"] == "email"}
    assert emails[booking.patient_id]["status"] == "sent"
    assert emails[booking.provider_id]["status"] == "skipped"
    assert emails[booking.provider_id]["last_error"] == "no email address known"


async def test_a_silent_directory_costs_at_most_a_second_and_push_still_goes_out(
    clinic: Clinic,
) -> None:
    booking = Booking()  # the directory does not answer for these users
    async with clinic.running():
        started = time.monotonic()  # the service's own start is not the directory's cost
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await eventually(lambda: _count(clinic, "appointment-confirmed", 2), what="the pushes")
        took = time.monotonic() - started
        await clinic.wait_settled()
    assert took < 5

    assert len(await clinic.pushes()) == 2
    assert clinic.sink.messages == []
    statuses = sorted((r["channel"], r["status"]) for r in await clinic.deliveries())
    assert statuses == [("email", "skipped")] * 2 + [("push", "sent")] * 2


async def test_a_directory_request_without_an_answer_gives_up_after_one_second(
    clinic: Clinic,
) -> None:
    # As the service makes it, once the directory has been silent for long enough.
    directory = Directory(clinic.nc, Tuning().directory_timeout, silence=0.0)
    started = time.monotonic()
    assert await directory.contact(uuid.uuid4()) is None  # subscribed, never answers
    assert 0.9 <= time.monotonic() - started < 5  # its 1 s, not less (nor for ever)


async def test_no_directory_at_all_means_no_email_at_once(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        # At once: with a 60 s timeout, a request that waited for an answer fails the test.
        assert (
            await asyncio.wait_for(Directory(nc, timeout=60, silence=0).contact(uuid.uuid4()), 10)
            is None
        )
    finally:
        await nc.close()


async def test_a_silent_directory_is_warned_of_once_per_silence(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(nats_url)
    directory = Directory(nc, timeout=0.2, silence=0.0)
    try:
        with caplog.at_level(logging.INFO, logger="services.notifications.directory"):
            for _ in range(3):
                assert await directory.contact(uuid.uuid4()) is None  # nobody listens

            async def answer(msg: Msg) -> None:
                await msg.respond(b'{"email": null}')

            answering = await nc.subscribe("directory.v1.contact.*", cb=answer)
            assert (await directory.contact(uuid.uuid4())) is not None
            await answering.unsubscribe()
            assert await directory.contact(uuid.uuid4()) is None
    finally:
        await nc.close()
    told = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in told] == ["WARNING", "INFO", "INFO", "INFO", "WARNING"], told
    assert "no directory listens" in told[0][1] and "email skipped" in told[0][1]
    assert told[3][1] == "the directory answers again"


async def test_a_refused_recipient_fails_for_good_without_holding_up_the_others(
    clinic: Clinic, caplog: pytest.LogCaptureFixture
) -> None:
    booking = Booking()
    clinic.know(booking)
    patient = booking.email_of("patient")
    # Servers repeat the address they refuse: it must not reach the log or the database.
    clinic.sink.refusals[patient] = [f"550 5.1.1 <{patient}>: Recipient address rejected"] * 5
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()

    emails = {r["recipient_id"]: r for r in await clinic.deliveries() if r["channel"] == "email"}
    assert emails[booking.patient_id]["status"] == "failed"
    assert emails[booking.patient_id]["attempts"] == 1
    assert "550" in emails[booking.patient_id]["last_error"]
    assert patient not in emails[booking.patient_id]["last_error"]
    ours = "\n".join(
        r.getMessage() + repr(vars(r)) for r in caplog.records if r.name.startswith("services")
    )
    assert patient.split("@")[0] not in ours  # (the test's SMTP server logs it: not ours)
    assert "delivery failed for good" in ours
    assert emails[booking.provider_id]["status"] == "sent"
    assert [m["To"] for m in clinic.sink.messages] == [booking.email_of("provider")]


async def test_a_directory_address_that_is_not_one_plain_address_gets_no_email(
    clinic: Clinic,
) -> None:
    booking = Booking()
    clinic.know(booking)
    patient, provider = booking.email_of("patient"), booking.email_of("provider")
    clinic.contacts[booking.patient_id]["email"] = f"{patient}, spy@evil.example"
    clinic.contacts[booking.provider_id]["email"] = f"{provider}\r\nBcc: spy@evil.example"
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()

    assert clinic.sink.messages == []  # neither to the list nor past the line break
    emails = [r for r in await clinic.deliveries() if r["channel"] == "email"]
    assert [r["status"] for r in emails] == ["skipped"] * 2, emails
    assert {r["last_error"] for r in emails} == {"the directory's address is not one plain address"}
    assert len(await clinic.pushes()) == 2


async def test_a_transient_smtp_refusal_is_retried_with_backoff(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    clinic.sink.refusals[booking.email_of("patient")] = ["451 4.3.0 try again later"]
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()

        async def refused_once() -> bool:
            return len(await clinic.deliveries("pending")) == 1

        # Settled can be seen a moment before the refusal is recorded on a loaded machine.
        await eventually(refused_once, what="the refused email to wait for its retry")
        (retrying,) = await clinic.deliveries("pending")
        assert retrying["attempts"] == 1
        assert retrying["next_attempt_at"] == clinic.clock() + TEST_TUNING.retry_base
        clinic.clock.advance(seconds=31)
        await eventually(lambda: _mails(clinic, 2), what="the retried email")
        await clinic.wait_settled()
    assert sorted(m["To"] for m in clinic.sink.messages) == sorted(
        [booking.email_of("patient"), booking.email_of("provider")]
    )


async def test_a_transient_refusal_of_the_message_itself_is_retried(clinic: Clinic) -> None:
    # The server answered the content with 451: it did not take it, so it is not in doubt.
    booking = Booking()
    clinic.know(booking)
    clinic.sink.data_refusals = ["451 4.3.0 try again later"]
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()

        async def refused_once() -> bool:
            pending = await clinic.deliveries("pending")
            return len(pending) == 1 and pending[0]["attempts"] == 1

        # The retry is due 30 s after the refusal is recorded: wait for that first.
        await eventually(refused_once, what="the refused email to wait for its retry")
        clinic.clock.advance(seconds=31)
        await eventually(lambda: _mails(clinic, 2), what="the retried email")
        await clinic.wait_settled()
    assert {d["status"] for d in await clinic.deliveries() if d["channel"] == "email"} == {"sent"}


async def _count(clinic: Clinic, kind: str, expected: int) -> bool:
    return sum(p.kind == kind for p in await clinic.pushes()) == expected


async def _mails(clinic: Clinic, expected: int) -> bool:
    return len(clinic.sink.messages) == expected


async def test_an_email_whose_acceptance_never_arrived_is_not_sent_again(
    clinic: Clinic, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server keeps the message but answers after the client gave up waiting: a
    # retry would be a second copy, so it is recorded as in doubt (at most once).
    monkeypatch.setattr(email_channel, "SMTP_TIMEOUT_SECONDS", 0.3)
    clinic.sink.reply_delay = 1.0
    booking = Booking()
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
        clinic.clock.advance(hours=1)  # past any retry's backoff
        await clinic.wait_settled()
    assert len(clinic.sink.to(booking.email_of("patient"))) == 1
    emails = [d for d in await clinic.deliveries() if d["channel"] == "email"]
    assert emails and all(d["status"] == "failed" for d in emails)
    assert all("in doubt" in d["last_error"] for d in emails)


async def test_a_push_finds_the_notifications_stream_made_again_after_it_was_lost(
    clinic: Clinic,
) -> None:
    first, second = Booking(), Booking()
    async with clinic.running():
        await clinic.publish(first.scheduled(clinic.clock()), first.clinic_id)
        await clinic.wait_settled()
        # Deleted, as by an operator, or lost by a server restarted without its storage.
        await clinic.js.delete_stream(NOTIFICATIONS_STREAM)
        await clinic.publish(second.scheduled(clinic.clock()), second.clinic_id)
        await clinic.wait_settled()
        pushes = await clinic.pushes()
        assert {p.appointment_id for p in pushes} == {second.appointment_id}
        assert len(pushes) == 2
        info = await clinic.js.stream_info(NOTIFICATIONS_STREAM)
        assert info.config.max_age == notifications_stream_config().max_age
    push = [r for r in await clinic.deliveries() if r["channel"] == "push"]
    assert [(r["status"], r["attempts"]) for r in push] == [("sent", 1)] * 4


async def test_the_lag_reads_the_last_event_handled_then_zero_once_caught_up(
    clinic: Clinic,
) -> None:
    """An event that happened an hour ago shows an hour of lag (a backlog after an outage
    of the service), and 0 once nothing is pending: not left at an hour."""
    booking = Booking()
    clinic.know(booking)

    def lag() -> float | None:
        return REGISTRY.get_sample_value("clinic_notifications_lag_seconds")

    async def lagging() -> bool:
        return (lag() or 0) >= 3590

    async def caught_up() -> bool:
        return lag() == 0

    async with clinic.running():
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        await clinic.publish(booking.scheduled(an_hour_ago), booking.clinic_id)
        await eventually(lagging, what="an hour of lag")
        await eventually(caught_up, what="no lag once caught up")
