"""The shipped NATS permissions (deploy/nats-auth.conf) let every clinic process do its work
and keep each client to its own: a booking and its cancel over the service API reach the
gateway as events and pushes, an email goes to the address the directory gave, and no
process's log shows a permissions violation; a client without credentials is refused, and
the gateway cannot publish an event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from services.embedded import EmbeddedNats, free_port
from tests.e2e.conftest import JWT_SECRET
from tests.e2e.nats_support import assert_ok, wait_for_service
from tests.integration.test_notifications_mailbox import SmtpSink, smtp
from tests.support.checks import wait_for
from tests.support.processes import Worker, clinic_command

__all__ = ["smtp"]  # fixtures

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PASSWORDS = {
    "appointments": "appointments-secret",
    "notifications": "notifications-secret",
    "gateway": "gateway-secret",
    "directory": "directory-secret",
}


@pytest.fixture
def secured_nats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedNats]:
    """A NATS server whose users and permissions are deploy/nats-auth.conf's."""
    for user, password in PASSWORDS.items():
        monkeypatch.setenv(f"NATS_{user.upper()}_PASSWORD", password)
    shutil.copy(DEPLOY / "nats-auth.conf", tmp_path / "nats-auth.conf")
    config = tmp_path / "nats.conf"
    config.write_text("include ./nats-auth.conf\n")  # as deploy/nats.conf does
    monitoring = free_port()  # as deploy/nats.conf serves it (8222)
    server = EmbeddedNats(
        tmp_path / "jetstream", extra_args=["-c", str(config), "-m", str(monitoring)]
    )
    server.monitoring_port = monitoring  # type: ignore[attr-defined]
    server.start()
    try:
        yield server
    finally:
        server.stop()


def clinic_inboxes(server: EmbeddedNats) -> list[str]:
    """The clinic processes' inboxes with a subscription of their own (their consumers'
    fetches; not the wildcard of their requests' answers), as NATS's monitoring lists them."""
    port = server.monitoring_port  # type: ignore[attr-defined]
    connz = httpx.get(f"http://127.0.0.1:{port}/connz?subs=detail&auth=1", timeout=5).json()
    return sorted(
        sub["subject"]
        for conn in connz["connections"]
        if conn.get("authorized_user") in ("appointments", "notifications")
        for sub in conn.get("subscriptions_list_detail", [])
        if sub["subject"].startswith("_INBOX.") and not sub["subject"].endswith("*")
    )


async def book(gateway: nats.NATS, patient: dict[str, str], starts_at: datetime) -> Msg:
    """The gateway's booking of ``patient`` with a new provider at ``starts_at``."""
    body = {
        "patient_id": patient["id"],
        "provider_id": str(uuid.uuid4()),
        "starts_at": starts_at.isoformat(),
        "duration_minutes": 30,
        "timezone": "Europe/Berlin",
        "actor": patient,
    }
    return await gateway.request("appointments.v1.cmd.schedule", json.dumps(body).encode(), 10)


def url_of(server: EmbeddedNats, user: str) -> str:
    return f"nats://{user}:{PASSWORDS[user]}@127.0.0.1:{server.port}"


async def connect(server: EmbeddedNats, user: str, errors: list[str]) -> nats.NATS:
    async def on_error(exc: Exception) -> None:
        errors.append(f"{user}: {exc}")

    return await nats.connect(url_of(server, user), error_cb=on_error, max_reconnect_attempts=0)


async def test_each_clinic_process_works_within_its_permissions(
    secured_nats: EmbeddedNats,
    database_url: str,
    smtp: tuple[SmtpSink, str],
    tmp_path: Path,
) -> None:
    sink, smtp_url = smtp
    violations: list[str] = []  # what NATS told the test's own clients
    common = {
        "CLINIC_DATABASE_URL": database_url,
        "CLINIC_JWT_SECRET": JWT_SECRET,
        "CLINIC_LOG_LEVEL": "INFO",
    }
    workers = [
        Worker(
            "appointments",
            clinic_command("appointments"),
            {
                **common,
                "CLINIC_NATS_URL": url_of(secured_nats, "appointments"),
                "CLINIC_HTTP_PORT": str(free_port()),
            },
            tmp_path,
        ),
        Worker(
            "notifications",
            clinic_command("notifications"),
            {
                **common,
                "CLINIC_NATS_URL": url_of(secured_nats, "notifications"),
                "CLINIC_HTTP_PORT": str(free_port()),
                "CLINIC_SMTP_URL": smtp_url,
            },
            tmp_path,
        ),
    ]
    directory = await connect(secured_nats, "directory", violations)
    gateway = await connect(secured_nats, "gateway", violations)
    patient = {"id": str(uuid.uuid4()), "role": "patient", "clinic_id": str(uuid.uuid4())}

    async def contact(msg: Msg) -> None:
        user = msg.subject.rsplit(".", 1)[1]
        await msg.respond(json.dumps({"email": f"{user}@example.test", "locale": "en"}).encode())

    events: list[str] = []
    pushes: list[str] = []

    async def event(msg: Msg) -> None:
        events.append(msg.subject.rsplit(".", 1)[1])

    async def push(msg: Msg) -> None:
        pushes.append(msgspec.json.decode(msg.data)["kind"])

    snooped: list[str] = []  # what the gateway's "_INBOX.>" got

    async def snoop(msg: Msg) -> None:
        snooped.append(msg.subject)

    await directory.subscribe("directory.v1.contact.*", cb=contact)
    await gateway.subscribe("_INBOX.>", cb=snoop)
    await gateway.subscribe("appointments.v1.events.>", cb=event)
    await gateway.subscribe("notifications.v1.sent.>", cb=push)
    try:
        for worker in workers:
            await worker.start()
        await wait_for_service(gateway, seconds=60)
        starts_at = datetime.now(UTC) + timedelta(days=3)
        booked = assert_ok(await book(gateway, patient, starts_at))
        cancel = {"appointment_id": booked["appointment_id"], "actor": patient}
        assert_ok(
            await gateway.request("appointments.v1.cmd.cancel", json.dumps(cancel).encode(), 10)
        )

        async def told() -> bool:  # patient and provider: confirmed, then cancelled
            return (
                sorted(pushes) == ["appointment-cancelled"] * 2 + ["appointment-confirmed"] * 2
                and len(sink.messages) == 4
            )

        await wait_for(told, 60, "the pushes and the emails")
        assert events == ["scheduled", "cancelled"]
        assert f"{patient['id']}@example.test" in {m["To"] for m in sink.messages}

        # What others may not do.
        with pytest.raises(Exception) as anonymous:  # nats-py raises kinds of its own
            await asyncio.wait_for(nats.connect(secured_nats.url, allow_reconnect=False), 10)
        assert "authorization" in repr(anonymous.value).lower(), repr(anonymous.value)
        await gateway.publish("appointments.v1.events.forged", b"{}")
        await gateway.flush()

        async def refused() -> bool:
            return any(v.startswith("gateway") and "violation" in v.lower() for v in violations)

        with contextlib.suppress(AssertionError):
            await wait_for(refused, 10, "the gateway's forged event refused")
        assert await refused(), violations
        # The clinic's durable consumers are not the gateway's to delete or to pull from,
        # and what went to the clinic processes' inboxes (the directory's answers, the
        # JetStream API's) never reached the gateway's "_INBOX.>".
        theirs = ("_INBOX.appointments.", "_INBOX.notifications.")
        assert snooped and not [s for s in snooped if s.startswith(theirs)], snooped
        tampering = [
            "$JS.API.CONSUMER.DELETE.APPOINTMENTS.visits-projector",
            "$JS.API.CONSUMER.DELETE.APPOINTMENTS.notifications",
            "$JS.API.CONSUMER.MSG.NEXT.APPOINTMENTS.notifications",
        ]
        for subject in tampering:
            await gateway.publish(subject, b'{"batch": 1}', reply=gateway.new_inbox())
        # The create request without a name in its subject takes it from its body.
        rewrite = {
            "stream_name": "APPOINTMENTS",
            "config": {
                "name": "visits-projector",
                "durable_name": "visits-projector",
                "ack_policy": "explicit",
                "max_deliver": 1,
            },
        }
        unnamed = "$JS.API.CONSUMER.CREATE.APPOINTMENTS"
        await gateway.publish(unnamed, json.dumps(rewrite).encode(), reply=gateway.new_inbox())
        tampering.append(unnamed)
        await gateway.flush()

        async def all_refused() -> bool:
            told = " ".join(violations).lower()  # (nats-py lowers the server's words)
            return all(subject.lower() in told for subject in tampering)

        with contextlib.suppress(AssertionError):
            await wait_for(all_refused, 10, "the gateway's tampering refused")
        assert await all_refused(), violations
        owner = await nats.connect(
            url_of(secured_nats, "appointments"), inbox_prefix="_INBOX.appointments"
        )
        try:
            for consumer in ("visits-projector", "notifications"):
                info = await owner.jetstream().consumer_info("APPOINTMENTS", consumer)
                assert info.config.max_deliver != 1  # still there, unchanged
        finally:
            await owner.close()
        # A consumer of the gateway's own, named, it may make and read.
        gateway_js = gateway.jetstream()
        await gateway_js.add_consumer(
            "APPOINTMENTS", ConsumerConfig(name="gateway-events", ack_policy=AckPolicy.EXPLICIT)
        )
        mine = await gateway_js.consumer_info("APPOINTMENTS", "gateway-events")
        assert mine.num_pending == 2  # the booking and its cancel
        # Nor is a reply subject of its choosing a way round them: the appointments process
        # may answer on any (allow_responses) and publishes on JetStream's API and the event
        # subjects, so it answers on inboxes only. Else its answer to a query or a ping would
        # purge the stream (JetStream reads no field it does not know in the purge request),
        # or be stored as an event, or go out as a push.
        query = json.dumps({"appointment_id": booked["appointment_id"], "actor": patient})
        forged = [
            "$JS.API.STREAM.PURGE.APPOINTMENTS",
            f"appointments.v1.events.{patient['clinic_id']}.{booked['appointment_id']}.cancelled",
            "notifications.v1.sent.visit-ready",
        ]
        for subject, data in (("appointments.v1.query.get", query.encode()), ("$SRV.PING", b"")):
            for reply in forged:
                await gateway.publish(subject, data, reply=reply)
            assert (await gateway.request(subject, data, timeout=10)).data  # handled in order
        stream = await gateway_js.stream_info("APPOINTMENTS")
        assert (stream.state.messages, stream.state.first_seq) == (2, 1)
        assert sorted(pushes) == ["appointment-cancelled"] * 2 + ["appointment-confirmed"] * 2
        # Nor one of the clinic processes' own inboxes, which NATS's monitoring lists: the
        # answer lands in the fetch of the projector's or the notification service's
        # consumer, which drop what JetStream did not deliver for them (the notification
        # service died of it, the projector stalled while they came).
        inboxes = clinic_inboxes(secured_nats)
        assert {i.split(".")[1] for i in inboxes} == {"appointments", "notifications"}, inboxes
        for inbox in inboxes:  # NATS lets the service answer once on each
            await gateway.publish("appointments.v1.query.get", query.encode(), reply=inbox)
            if inbox.startswith("_INBOX.appointments."):  # its own: answered on none
                await gateway.publish("$SRV.PING", b"", reply=inbox)
        await gateway.flush()
        later = assert_ok(await book(gateway, patient, starts_at + timedelta(days=1)))

        async def confirmed_too() -> bool:
            return pushes.count("appointment-confirmed") == 4

        await wait_for(confirmed_too, 30, "the later booking's confirmations")
        assert all(worker.running for worker in workers)
        token = f"{later['appointment_id']}.1"
        visits = assert_ok(
            await gateway.request(
                "appointments.v1.query.visits",
                json.dumps({"actor": patient, "consistency_token": token}).encode(),
                timeout=10,
            )
        )
        assert later["appointment_id"] in {v["appointment_id"] for v in visits["items"]}
    finally:
        for worker in workers:
            await worker.stop()
        await gateway.close()
        await directory.close()
    logs = "\n".join(w.log_path.read_text(errors="replace") for w in workers)
    assert "violation" not in logs.lower(), "\n".join(w.log_tail(60) for w in workers)
    refusals = [
        line
        for line in secured_nats.log_file.read_text(errors="replace").splitlines()
        if "Violation" in line and "gateway" not in line  # (2.9 and 2.15 word it apart)
    ]
    assert refusals == []  # the server refused nothing the clinic's processes did
    assert [v for v in violations if "gateway" not in v] == []
    assert events == ["scheduled", "cancelled", "scheduled"]  # no forged one reached anyone
