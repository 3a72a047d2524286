"""Messages aimed where they do not belong: a request whose reply subject is no caller's
inbox is not answered, and a fetch keeps only what JetStream delivered for its consumer."""

from __future__ import annotations

from typing import Any, cast

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.appointments.entrypoints.nats.service import Replies
from services.nats_client import delivered_for

ACK = "$JS.ACK.APPOINTMENTS.{consumer}.1.7.7.1700000000000000000.0"


def message(reply: str) -> Msg:
    return Msg(cast(NATS, None), subject="appointments.v1.events.c.a.scheduled", reply=reply)


def test_a_fetch_keeps_only_what_jetstream_delivered_for_its_consumer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ours = message(ACK.format(consumer="visits-projector"))
    aimed = [
        message(""),  # an answer a service was made to send to the consumer's inbox
        message("_INBOX.gateway.x"),
        message(ACK.format(consumer="gateway-events")),  # a client's push consumer
        message(ACK.format(consumer="visits-projector").replace("APPOINTMENTS", "OTHER")),
        message("$JS.ACK.garbage"),
    ]
    assert delivered_for([aimed[0], ours, *aimed[1:]], "APPOINTMENTS", "visits-projector") == [ours]
    assert "on the inbox of consumer visits-projector" in caplog.text


class _Nats:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def new_inbox(self) -> str:
        return f"{self.prefix}.Nuid123"


@pytest.mark.parametrize(
    ("prefix", "reply", "answered"),
    [
        ("_INBOX.appointments", "_INBOX.Xyz.1", True),
        ("_INBOX.appointments", "_INBOX.gateway.Xyz", True),
        ("_INBOX.appointments", "_INBOX_billing.Xyz", True),
        ("_INBOX.appointments", "", True),  # nobody to answer: handled, unanswered
        ("_INBOX.appointments", "_R_.3QVfd9.GGtHf8", True),  # from another account
        ("_INBOX.appointments", "_INBOX.appointments.Xyz", False),  # its own fetches'
        ("_INBOX.appointments", "$JS.API.STREAM.PURGE.APPOINTMENTS", False),
        ("_INBOX.appointments", "appointments.v1.events.c.a.cancelled", False),
        ("_INBOX", "_INBOX.Xyz.1", True),  # no user: its inboxes are everyone's
        ("_INBOX", "notifications.v1.sent.visit-ready", False),
    ],
)
def test_the_service_answers_on_callers_inboxes_only(
    prefix: str, reply: str, answered: bool
) -> None:
    replies = Replies.of(cast(Any, _Nats(prefix)))
    assert replies.answerable(reply, "appointments.v1.query.get") is answered
