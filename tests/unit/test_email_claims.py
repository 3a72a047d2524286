"""An email is in doubt only once its worker marked it as being handed to the SMTP server;
a worker that vanished before (mid-batch, in the directory lookup) sent nothing, so its
deliveries go out after the lease. And a directory that could not be asked because our own
NATS connection is down is a failure worth a retry, not "no email address". And a visit's
notifications have one order, the one the claim delivers them in (the claim itself is
proved on PostgreSQL: tests/integration/test_email_order.py)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import nats.errors
import pytest
from prometheus_client import REGISTRY

from contracts.common import Actor
from contracts.events import AppointmentCancelled, AppointmentScheduled
from contracts.notifications import NOTIFICATION_KINDS, DirectoryContactReply, Notification
from services.appointments.domain.rules import Rules
from services.notifications.channels import DeliveryFailed
from services.notifications.delivery import DeliveryWorker
from services.notifications.delivery_store import (
    ClaimedDelivery,
    DeliveryStore,
    abandoned_in_doubt,
)
from services.notifications.directory import STALL_SECONDS, Directory, DirectoryUnavailable
from services.notifications.domain import (
    VISIT_ORDER,
    appointment_of,
    on_cancelled,
    on_scheduled,
    on_timer,
    timers_of,
)
from services.notifications.email import EmailChannel, SmtpConfig
from services.notifications.runtime import Hooks, Tuning
from tests.support.builders import planned_notification

NOW = datetime(2030, 1, 12, 9, 0, tzinfo=UTC)

# ------------------------------------------------------------------ which are in doubt


@pytest.mark.parametrize(
    ("channel", "previous_status", "previous_phase", "in_doubt"),
    [
        ("email", "pending", None, False),  # a first attempt, or a retry
        ("email", "sending", "claimed", False),  # its worker died before the hand-over
        ("email", "sending", "handing-over", True),  # the server may have it
        ("email", "sending", None, True),  # claimed by a release that did not mark it
        ("push", "pending", None, False),
        # Never published by this release, but the release before marked no push and its
        # claims look the same: in doubt until the next release trusts the mark.
        ("push", "sending", "claimed", True),
        ("push", "sending", "handing-over", True),  # JetStream may have it
        ("push", "sending", None, True),  # claimed by a release that did not mark it
    ],
)
def test_only_a_delivery_marked_as_handed_over_is_in_doubt(
    channel: str, previous_status: str, previous_phase: str | None, in_doubt: bool
) -> None:
    assert abandoned_in_doubt(channel, previous_status, previous_phase) is in_doubt


# ------------------------------------------------------------------- a visit's order


def test_every_kind_of_notification_has_one_place_in_a_visits_order() -> None:
    # A kind left out would neither wait for the visit's earlier notifications nor hold
    # back its later ones (the claim finds no place for it).
    assert sorted(VISIT_ORDER) == sorted(NOTIFICATION_KINDS)
    assert len(set(VISIT_ORDER)) == len(VISIT_ORDER)


@pytest.mark.parametrize(
    "lead", [timedelta(days=3), timedelta(hours=2), timedelta(minutes=5)], ids=str
)
def test_a_visit_decides_its_notifications_in_the_order_they_are_delivered(
    lead: timedelta,
) -> None:
    """Booked (``lead`` ahead), reminded as its time comes, then cancelled: what each step
    decides never comes before what the steps before it decided."""
    starts_at = NOW + timedelta(days=5)
    patient, provider = uuid.uuid4(), uuid.uuid4()
    booked = AppointmentScheduled(
        clinic_id=uuid.uuid4(),
        patient_id=patient,
        provider_id=provider,
        starts_at=starts_at,
        duration_minutes=30,
        timezone="Europe/Berlin",
        scheduled_by=Actor(id=patient, role="patient"),
    )
    visit = appointment_of(uuid.uuid4(), uuid.uuid4(), booked)
    story = [n.kind for n in on_scheduled(visit)]
    for timer in sorted(timers_of(visit, starts_at - lead, Rules()), key=lambda t: t.due_at):
        story += [n.kind for n in on_timer(visit, timer, timer.due_at)]
    cancelled = AppointmentCancelled(
        clinic_id=visit.clinic_id, cancelled_by=Actor(id=patient, role="patient"), cancelled_at=NOW
    )
    story += [n.kind for n in on_cancelled(visit, uuid.uuid4(), cancelled)]
    assert story[-1] == "appointment-cancelled" and "visit-ready" in story
    assert story == sorted(story, key=VISIT_ORDER.index)


# ------------------------------------------------------------- the worker's hand-over


class _Outbox:
    """The deliveries outbox, in memory: one claimable delivery of ``channel``; it keeps
    the order of what is written (``steps``, shared with the channel)."""

    def __init__(self, channel: str, steps: list[str], *, claim_ours: bool = True) -> None:
        self.notification = planned_notification("visit-ready")
        self.due = [
            ClaimedDelivery(
                notification=self.notification,
                channel=channel,  # type: ignore[arg-type]
                attempts=3,
                in_doubt=False,
                previous_claimed_at=None,
            )
        ]
        self.steps = steps
        self.claim_ours = claim_ours
        self.mark_error: Exception | None = None
        self.marks: list[tuple[uuid.UUID, str, int]] = []
        self.recorded: list[str] = []
        self.outcome_claims: list[int] = []
        """The claim (``attempts``) each outcome was written for."""
        self.outcome_ours = True
        """Whether an outcome write still finds the claim this worker's."""

    async def claim(self, *_: object) -> list[ClaimedDelivery]:
        due, self.due = self.due, []
        return due

    async def handing_over(self, notification_id: uuid.UUID, channel: str, attempts: int) -> bool:
        if self.mark_error is not None:
            raise self.mark_error
        self.steps.append("mark")
        self.marks.append((notification_id, channel, attempts))
        return self.claim_ours

    async def sent(self, _: uuid.UUID, __: str, attempts: int, *___: object) -> bool:
        return self._outcome("sent", attempts)

    async def retry(self, _: uuid.UUID, __: str, attempts: int, *___: object) -> bool:
        return self._outcome("retry", attempts)

    async def finish(self, _: uuid.UUID, __: str, attempts: int, status: str, *___: object) -> bool:
        return self._outcome(status, attempts)

    def _outcome(self, outcome: str, attempts: int) -> bool:
        self.outcome_claims.append(attempts)
        if self.outcome_ours:
            self.recorded.append(outcome)
        return self.outcome_ours


class _MarkingEmail:
    """An email channel that says when it hands the message over."""

    name = "email"

    def __init__(self, steps: list[str]) -> None:
        self.steps = steps
        self.handed_over: list[Notification] = []

    async def send(self, notification: Notification) -> str | None:
        raise AssertionError("the worker must let the channel say when it hands over")

    async def send_marked(
        self, notification: Notification, hand_over: Callable[[], Awaitable[None]]
    ) -> str | None:
        self.steps.append("directory and connection")
        await hand_over()
        self.steps.append("handed over")
        self.handed_over.append(notification)
        return None


class _PlainChannel:
    """A channel that cannot say when it hands over."""

    def __init__(self, name: str, steps: list[str]) -> None:
        self.name = name
        self.steps = steps

    async def send(self, notification: Notification) -> str | None:
        self.steps.append("send")
        return None


def _worker(outbox: _Outbox, channel: Any) -> DeliveryWorker:
    store = cast(DeliveryStore, outbox)
    return DeliveryWorker(store, channel, lambda: NOW, Tuning(), Hooks(), resend_window=None)


async def test_an_email_is_marked_as_handed_over_after_the_lookup_and_just_before_it_goes() -> None:
    steps: list[str] = []
    outbox = _Outbox("email", steps)
    email = _MarkingEmail(steps)
    assert await _worker(outbox, email).deliver_due() == 1
    assert steps == ["directory and connection", "mark", "handed over"]
    assert outbox.marks == [(outbox.notification.notification_id, "email", 3)]  # this claim
    assert outbox.recorded == ["sent"]


async def test_an_email_whose_claim_was_lost_is_neither_sent_nor_recorded() -> None:
    """Its lease ran out (a slow directory) and another worker claimed it: that one sends
    it; a second copy from this one would break at most once."""
    steps: list[str] = []
    outbox = _Outbox("email", steps, claim_ours=False)
    email = _MarkingEmail(steps)
    assert await _worker(outbox, email).deliver_due() == 1
    assert email.handed_over == []
    assert outbox.recorded == []


async def test_a_hand_over_mark_that_cannot_be_written_sends_nothing() -> None:
    steps: list[str] = []
    outbox = _Outbox("email", steps)
    outbox.mark_error = RuntimeError("the database refused the mark")
    email = _MarkingEmail(steps)
    assert await _worker(outbox, email).deliver_due() == 1
    assert email.handed_over == []
    assert outbox.recorded == ["retry"]  # never handed over: safe to try again


async def test_an_email_channel_that_cannot_say_when_is_marked_before_its_send() -> None:
    steps: list[str] = []
    outbox = _Outbox("email", steps)
    assert await _worker(outbox, _PlainChannel("email", steps)).deliver_due() == 1
    assert steps == ["mark", "send"]
    assert outbox.recorded == ["sent"]


async def test_push_marks_the_hand_over_before_it_publishes() -> None:
    steps: list[str] = []
    outbox = _Outbox("push", steps)
    assert await _worker(outbox, _PlainChannel("push", steps)).deliver_due() == 1
    assert steps == ["mark", "send"]
    assert len(outbox.marks) == 1
    assert outbox.recorded == ["sent"]


# -------------------------------------------------------- every outcome is the claim's


class _Outcome:
    """A channel whose send ends one way: sent, skipped (a reason), or a failure."""

    def __init__(self, name: str, result: str | DeliveryFailed | None) -> None:
        self.name = name
        self.result = result
        self.sent: list[Notification] = []

    async def send(self, notification: Notification) -> str | None:
        if isinstance(self.result, DeliveryFailed):
            raise self.result
        self.sent.append(notification)
        return self.result


#: How a delivery ends, what the worker writes for it, and the counter that says so.
_ENDINGS: list[tuple[str, dict[str, Any], str | DeliveryFailed | None, str, str]] = [
    ("sent", {}, None, "sent", "sent"),
    ("retry", {}, DeliveryFailed("connection refused", permanent=False), "retry", "retried"),
    ("failed", {}, DeliveryFailed("550 no such user", permanent=True), "failed", "failed"),
    ("skipped by the channel", {}, "no email address known", "skipped", "skipped"),
    ("in doubt", {"in_doubt": True}, None, "failed", "failed"),
    ("outdated", {"outdated": "after AppointmentCancelled"}, None, "skipped", "skipped"),
]


def _count(kind: str, channel: str, result: str) -> float:
    labels = {"kind": kind, "channel": channel, "result": result}
    return REGISTRY.get_sample_value("clinic_notifications_total", labels) or 0.0


@pytest.mark.parametrize("channel", ["email", "push"])
@pytest.mark.parametrize(
    ("claimed", "result", "written", "counted"),
    [ending[1:] for ending in _ENDINGS],
    ids=[ending[0] for ending in _ENDINGS],
)
async def test_every_outcome_is_written_for_the_claim_it_ends(
    channel: str,
    claimed: dict[str, Any],
    result: str | DeliveryFailed | None,
    written: str,
    counted: str,
) -> None:
    outbox = _Outbox(channel, [])
    outbox.due = [msgspec.structs.replace(outbox.due[0], **claimed)]
    before = _count(outbox.notification.kind, channel, counted)
    assert await _worker(outbox, _Outcome(channel, result)).deliver_due() == 1
    assert outbox.recorded == [written]
    assert outbox.outcome_claims == [3]  # this claim's attempts
    assert _count(outbox.notification.kind, channel, counted) == before + 1


@pytest.mark.parametrize("channel", ["email", "push"])
@pytest.mark.parametrize(
    ("claimed", "result", "written", "counted"),
    [ending[1:] for ending in _ENDINGS if ending[0] != "sent"],  # a fact: recorded anyway
    ids=[ending[0] for ending in _ENDINGS if ending[0] != "sent"],
)
async def test_an_outcome_of_a_lost_claim_is_logged_and_given_up_not_retried(
    caplog: pytest.LogCaptureFixture,
    channel: str,
    claimed: dict[str, Any],
    result: str | DeliveryFailed | None,
    written: str,
    counted: str,
) -> None:
    """Its lease ran out and another worker claimed the delivery (or recorded it): the
    store writes nothing; the worker says so and moves on, counting no outcome."""
    outbox = _Outbox(channel, [])
    outbox.due = [msgspec.structs.replace(outbox.due[0], **claimed)]
    outbox.outcome_ours = False
    kind = outbox.notification.kind
    before = _count(kind, channel, counted)
    with caplog.at_level(logging.INFO, logger="services.notifications.delivery"):
        assert await _worker(outbox, _Outcome(channel, result)).deliver_due() == 1
    assert outbox.recorded == []
    assert outbox.outcome_claims == [3]  # asked once, not again and again
    assert _count(kind, channel, counted) == before
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w for w in warnings if "claim lost" in w] != []
    assert [w for w in warnings if "could not record" in w] == []
    assert all(r.exc_info is None for r in caplog.records)


@pytest.mark.parametrize("channel", ["email", "push"])
async def test_a_send_recorded_sent_already_is_not_counted_twice(
    caplog: pytest.LogCaptureFixture, channel: str
) -> None:
    """Another worker sent it again (its lease ran out) and recorded it first."""
    outbox = _Outbox(channel, [])
    outbox.outcome_ours = False
    kind = outbox.notification.kind
    before = _count(kind, channel, "sent")
    with caplog.at_level(logging.INFO, logger="services.notifications.delivery"):
        assert await _worker(outbox, _Outcome(channel, None)).deliver_due() == 1
    assert outbox.outcome_claims == [3]
    assert _count(kind, channel, "sent") == before
    assert "recorded sent already" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------- the email channel's order


class _Directory:
    """The clinic directory port: an address, none, or not reachable from here."""

    def __init__(self, email: str | None = None, unavailable: bool = False) -> None:
        self.email = email
        self.unavailable = unavailable

    async def contact(
        self, user_id: uuid.UUID, clinic_id: uuid.UUID | None = None
    ) -> DirectoryContactReply | None:
        if self.unavailable:
            raise DirectoryUnavailable("NATS connection reconnecting")
        return DirectoryContactReply(email=self.email, locale="en")


def _notification() -> Notification:
    return planned_notification("visit-ready").sent(NOW)


async def _never_hand_over() -> None:
    raise AssertionError("handed over though the message cannot go out")


def _refused_port() -> int:
    """A local port nothing listens on (a connection to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _channel(directory: _Directory, port: int = 9) -> EmailChannel:
    return EmailChannel(cast(Directory, directory), SmtpConfig(host="127.0.0.1", port=port))


async def test_an_email_whose_directory_could_not_be_asked_is_retried_not_skipped() -> None:
    channel = _channel(_Directory(unavailable=True))
    with pytest.raises(DeliveryFailed) as failed:
        await channel.send_marked(_notification(), _never_hand_over)
    assert not failed.value.permanent
    assert "directory not asked" in failed.value.reason


async def test_an_email_without_an_address_is_skipped_before_any_hand_over() -> None:
    channel = _channel(_Directory(email=None))
    assert await channel.send_marked(_notification(), _never_hand_over) == (
        "no email address known"
    )


async def test_an_smtp_server_that_cannot_be_reached_is_retried_before_any_hand_over() -> None:
    channel = _channel(_Directory(email="pat@example.test"), port=_refused_port())
    with pytest.raises(DeliveryFailed) as failed:
        await channel.send_marked(_notification(), _never_hand_over)
    assert not failed.value.permanent


# ------------------------------------------------------------------------ the directory


class _Nats:
    """Our NATS connection as the directory sees it: its state and its requests."""

    def __init__(
        self,
        status: str = "connected",
        on_request: Callable[[_Nats], Awaitable[Any]] | None = None,
    ) -> None:
        self.status = status
        self.stats = {"reconnects": 0}
        self.requests: list[str] = []
        self._on_request = on_request
        self.server_hangs = False
        """Its server answers no ``PING`` (frozen, or behind a partition)."""

    @property
    def is_connected(self) -> bool:
        return self.status in ("connected", "draining")  # as nats-py says

    @property
    def is_reconnecting(self) -> bool:
        return self.status == "reconnecting"

    @property
    def is_closed(self) -> bool:
        return self.status == "closed"

    @property
    def is_draining(self) -> bool:
        return self.status == "draining"

    async def _send_ping(self, pong: asyncio.Future[bool]) -> None:
        if not self.server_hangs:
            pong.set_result(True)

    async def request(self, subject: str, payload: bytes = b"", **_: object) -> Any:
        self.requests.append(subject)
        assert self._on_request is not None
        return await self._on_request(self)


def _directory(nc: _Nats) -> Directory:
    """A directory whose first silence already means no address."""
    return Directory(cast(Any, nc), timeout=1.0, silence=0.0)


@pytest.mark.parametrize("status", ["reconnecting", "closed", "draining", "disconnected"])
async def test_a_connection_that_is_not_up_asks_nothing_and_says_so(status: str) -> None:
    nc = _Nats(status)
    with pytest.raises(DirectoryUnavailable):
        await _directory(nc).contact(uuid.uuid4())
    assert nc.requests == []


async def test_a_connection_lost_while_waiting_for_the_answer_is_no_answer_of_the_directory() -> (
    None
):
    async def drop(nc: _Nats) -> Any:
        nc.status = "reconnecting"  # the request sits in nats-py's buffer, then times out
        raise nats.errors.TimeoutError

    with pytest.raises(DirectoryUnavailable):
        await _directory(_Nats(on_request=drop)).contact(uuid.uuid4())


async def test_a_reconnect_while_waiting_for_the_answer_is_no_answer_of_the_directory() -> None:
    async def blip(nc: _Nats) -> Any:
        nc.stats["reconnects"] += 1  # down and up again: the question may be lost
        raise nats.errors.TimeoutError

    with pytest.raises(DirectoryUnavailable):
        await _directory(_Nats(on_request=blip)).contact(uuid.uuid4())


async def test_a_question_unanswered_while_its_server_hangs_is_no_answer_of_the_directory() -> None:
    async def hang(nc: _Nats) -> Any:
        nc.server_hangs = True  # the connection still looks up: nothing noticed the hang
        raise nats.errors.TimeoutError

    hanging = Directory(cast(Any, _Nats(on_request=hang)), timeout=0.05, silence=0.0)
    with pytest.raises(DirectoryUnavailable, match="does not answer a ping"):
        await hanging.contact(uuid.uuid4())


async def test_a_question_timed_out_while_this_process_stood_still_is_asked_again_later() -> None:
    """The answer may be unread in the socket when the timer fires late (a process
    CPU-throttled or paused past the timeout): not the directory's silence."""

    async def stalled(nc: _Nats) -> Any:
        time.sleep(0.05 + STALL_SECONDS + 0.1)  # noqa: ASYNC251 - the event loop stands still
        raise nats.errors.TimeoutError

    async def silent(nc: _Nats) -> Any:
        await asyncio.sleep(0.05)
        raise nats.errors.TimeoutError

    with pytest.raises(DirectoryUnavailable, match="this process stalled"):
        await Directory(cast(Any, _Nats(on_request=stalled)), timeout=0.05).contact(uuid.uuid4())
    assert (
        await Directory(cast(Any, _Nats(on_request=silent)), timeout=0.05, silence=0.0).contact(
            uuid.uuid4()
        )
        is None
    )


async def test_no_directory_listening_just_after_a_reconnect_is_asked_again_later() -> None:
    async def none_listens(nc: _Nats) -> Any:
        raise nats.errors.NoRespondersError

    nc = _Nats(on_request=none_listens)
    directory = Directory(cast(Any, nc), timeout=1.0, rejoin=0.2, silence=0.0)
    nc.stats["reconnects"] += 1  # NATS restarted: the directory's client may not be back
    with pytest.raises(DirectoryUnavailable):
        await directory.contact(uuid.uuid4())
    await asyncio.sleep(0.3)  # long enough for any directory to be back: none is deployed
    assert await directory.contact(uuid.uuid4()) is None


@pytest.mark.parametrize(
    "refusal",
    [nats.errors.ConnectionReconnectingError, nats.errors.ConnectionClosedError],
)
async def test_a_request_refused_by_our_own_connection_is_unavailable(
    refusal: type[Exception],
) -> None:
    async def refuse(nc: _Nats) -> Any:
        raise refusal

    with pytest.raises(DirectoryUnavailable):
        await _directory(_Nats(on_request=refuse)).contact(uuid.uuid4())


@pytest.mark.parametrize("silence", [nats.errors.TimeoutError, nats.errors.NoRespondersError])
async def test_a_connected_directory_that_does_not_answer_still_means_no_email(
    silence: type[Exception],
) -> None:
    async def unanswered(nc: _Nats) -> Any:
        raise silence

    assert await _directory(_Nats(on_request=unanswered)).contact(uuid.uuid4()) is None


@pytest.mark.parametrize("silence", [nats.errors.TimeoutError, nats.errors.NoRespondersError])
async def test_a_directory_silent_for_moments_only_is_asked_again_later(
    silence: type[Exception],
) -> None:
    """On a cluster the directory's node may be lost while ours is well: its client takes
    ~20 s to move to another node. A silence means no address only once it has lasted
    that long; an answer ends it."""
    answering = True

    async def reply(nc: _Nats) -> Any:
        if not answering:
            raise silence
        return SimpleNamespace(data=b'{"email": "a@example.test"}')

    directory = Directory(cast(Any, _Nats(on_request=reply)), timeout=1.0, silence=0.2)
    answering = False
    with pytest.raises(DirectoryUnavailable, match="asked again later"):
        await directory.contact(uuid.uuid4())
    answering = True
    assert await directory.contact(uuid.uuid4()) is not None  # the silence is over
    answering = False
    with pytest.raises(DirectoryUnavailable):
        await directory.contact(uuid.uuid4())
    await asyncio.sleep(0.3)  # silent for longer than any node's loss lasts: none is there
    assert await directory.contact(uuid.uuid4()) is None
