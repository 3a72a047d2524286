"""Bad input the running service shrugs off: forged, expired and misdirected tokens, other
clinics' tokens (which never learn whether an appointment exists), malformed and oversized
NATS requests, and poison messages on the APPOINTMENTS stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import nats
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from nats.js.errors import NotFoundError

from contracts.common import Principal
from contracts.subjects import (
    CMD_CANCEL,
    CMD_SCHEDULE,
    CMD_START,
    EVENTS_STREAM,
    QUERY_GET,
    QUERY_VISITS,
    event_subject,
)
from services.appointments.adapters.nats.streams import ensure_events_stream
from services.appointments.projector import CONSUMER
from services.embedded import EmbeddedNats
from tests.e2e.conftest import JWT_SECRET, Api
from tests.support.clock import ManualClock
from tests.support.service import running_service, service_env

pytestmark = pytest.mark.fault

MAX_PAYLOAD = 8 * 1024 * 1024
ISSUER, AUDIENCE = "https://id.clinic.example", "appointments"


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A NATS server of these tests alone that takes messages up to 8 MiB (the default is
    1 MiB), so that the service itself has to refuse oversized requests."""
    config = tmp_path / "nats.conf"
    config.write_text(f"max_payload: {MAX_PAYLOAD}\n")
    server = EmbeddedNats(tmp_path / "nats", extra_args=["-c", str(config)], die_with_parent=True)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def serving(database_url: str, nats_url: str, **env: str) -> AsyncIterator[Api]:
    """Every role of the service with these ``CLINIC_*`` settings (a short consistency wait)."""
    env = {"CLINIC_JWT_SECRET": JWT_SECRET, "CLINIC_CONSISTENCY_WAIT_MS": "1000", **env}
    async with running_service(service_env(database_url, [nats_url], **env)) as client:
        yield Api(base_url=str(client.base_url), clock=ManualClock(), client=client)


async def book(api: Api, headers: dict[str, str], patient: uuid.UUID, minutes: int = 10) -> str:
    body = {
        "patient_id": str(patient),
        "provider_id": str(uuid.uuid4()),
        "starts_at": (api.clock.now + timedelta(minutes=minutes)).isoformat(),
        "duration_minutes": 30,
        "timezone": "Europe/Berlin",
    }
    created = await api.client.post("/v1/appointments", json=body, headers=headers)
    assert created.status_code == 201, created.text
    location: str = created.headers["location"]
    return location


def every_endpoint(location: str) -> list[tuple[str, str]]:
    return [
        ("GET", location),
        ("POST", f"{location}/cancel"),
        ("POST", f"{location}/start"),
        ("GET", f"{location}/history"),
    ]


def answer_of(response: httpx.Response) -> tuple[int, str, Any]:
    return response.status_code, response.headers["content-type"], response.json()


def hs256_keyed_with(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token whose HMAC key is ``key`` (PyJWT refuses to make one with a PEM)."""

    def part(value: bytes) -> bytes:
        return base64.urlsafe_b64encode(value).rstrip(b"=")

    signing = part(b'{"alg":"HS256","typ":"JWT"}') + b"." + part(json.dumps(claims).encode())
    return (signing + b"." + part(hmac.new(key, signing, hashlib.sha256).digest())).decode()


async def test_forged_expired_and_misdirected_tokens_are_401_everywhere_and_reveal_nothing(
    database_url: str, nats_url: str, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "jwt.pem").write_bytes(public_pem)
    env = {
        "CLINIC_JWT_PUBLIC_KEY_FILE": str(tmp_path / "jwt.pem"),
        "CLINIC_JWT_ISSUER": ISSUER,
        "CLINIC_JWT_AUDIENCE": AUDIENCE,
    }
    async with serving(database_url, nats_url, **env) as api:
        staff = api.principal("staff")
        now = int(time.time())
        good = {
            "sub": str(staff.id),
            "role": "staff",
            "clinic_id": str(staff.clinic_id),
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 600,
        }

        def rs256(**changes: Any) -> str:
            claims = {k: v for k, v in (good | changes).items() if v is not None}
            return jwt.encode(claims, key, algorithm="RS256")

        # Both configured keys work, with the right issuer and audience.
        for token in (rs256(), jwt.encode(good, JWT_SECRET, algorithm="HS256")):
            headers = {"Authorization": f"Bearer {token}"}
            assert (await api.client.get("/v1/visits", headers=headers)).status_code == 200
        location = await book(api, {"Authorization": f"Bearer {rs256()}"}, uuid.uuid4())
        header, _, signature = rs256().split(".")
        other_claims = good | {"clinic_id": str(uuid.uuid4())}
        forged = {
            "HS256, another secret": jwt.encode(good, "another-secret-of-32-bytes-or-more!!"),
            "RS256, another key": jwt.encode(
                good, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"
            ),
            "ES256, another key": jwt.encode(
                good, ec.generate_private_key(ec.SECP256R1()), "ES256"
            ),
            "HS256 keyed with the public key": hs256_keyed_with(good, public_pem),
            "alg none": jwt.encode(good, None, algorithm="none"),
            "claims swapped under a valid signature": ".".join(
                [header, jwt.encode(other_claims, JWT_SECRET).split(".")[1], signature]
            ),
            "expired": rs256(iat=now - 7200, exp=now - 3600),
            "not yet valid": rs256(nbf=now + 3600),
            "issued in the future": rs256(iat=now + 3600),
            "wrong audience": rs256(aud="billing"),
            "no audience": rs256(aud=None),
            "wrong issuer": rs256(iss="https://id.evil.example"),
            "no issuer": rs256(iss=None),
            "no subject": rs256(sub=None),
            "truncated": rs256()[:-10],
        }
        unknown = f"/v1/appointments/{uuid.uuid4()}"
        sent = 0
        for name, token in forged.items():
            headers = {"Authorization": f"Bearer {token}"}
            for (method, path), (_, unknown_path) in zip(
                every_endpoint(location), every_endpoint(unknown), strict=True
            ):
                answer = answer_of(await api.client.request(method, path, headers=headers))
                assert answer[0] == 401 and answer[2]["code"] == "unauthenticated", (name, answer)
                # The same answer whether or not the appointment exists.
                assert (
                    answer_of(await api.client.request(method, unknown_path, headers=headers))
                    == answer
                ), name
                sent += 2
            visits = await api.client.get("/v1/visits", headers=headers)
            assert visits.status_code == 401, name
        still = await api.client.get(location, headers={"Authorization": f"Bearer {rs256()}"})
        assert still.json()["version"] == 1 and still.json()["status"] == "scheduled"
        figures = {"kinds": len(forged), "requests": sent + len(forged), "answered 401": "all"}
        record_property("figures", json.dumps(figures))
        print("forged tokens:", json.dumps(figures))


async def test_another_clinics_tokens_never_learn_an_appointment_exists(
    database_url: str, nats_url: str, record_property: pytest.RecordProperty
) -> None:
    async with serving(database_url, nats_url) as api:
        patient = api.principal("patient")
        location = await book(api, api.auth(patient), patient.id)
        appointment_id = location.rsplit("/", 1)[1]
        cancelled = await api.client.post(
            f"{location}/cancel", headers=api.auth(patient, **{"Idempotency-Key": "k-1"})
        )
        assert cancelled.status_code == 200
        elsewhere = uuid.uuid4()
        outsiders = [
            api.principal("staff", elsewhere),
            api.principal("provider", elsewhere),
            # The same user id in another clinic is another person.
            Principal(id=patient.id, role="patient", clinic_id=elsewhere),
            Principal(id=patient.id, role="staff", clinic_id=elsewhere),
        ]
        unknown = f"/v1/appointments/{uuid.uuid4()}"
        extras: list[dict[str, str]] = [{}, {"If-Match": '"2"'}, {"Idempotency-Key": "k-1"}]
        sent = 0
        for who in outsiders:
            for extra in extras:
                headers = api.auth(who, **extra)
                for (method, path), (_, unknown_path) in zip(
                    every_endpoint(location), every_endpoint(unknown), strict=True
                ):
                    answer = answer_of(await api.client.request(method, path, headers=headers))
                    assert answer[0] == 404, (who, extra, path, answer)
                    assert (
                        answer_of(await api.client.request(method, unknown_path, headers=headers))
                        == answer
                    )
                    sent += 2
            # Reading one's visits "after" that write neither waits differently nor lists it.
            tokens = [f"{appointment_id}.2", f"{uuid.uuid4()}.2"]
            answers = [
                await api.client.get(
                    "/v1/visits?tab=past",
                    headers=api.auth(who, **{"X-Consistency-Token": token}),
                )
                for token in tokens
            ]
            assert [a.json() for a in answers] == [{"items": [], "next_cursor": None}] * 2
            assert [a.headers["x-consistency"] for a in answers] == ["stale", "stale"]
            sent += 2
        mine = await api.client.get(
            "/v1/visits?tab=past",
            headers=api.auth(patient, **{"X-Consistency-Token": f"{appointment_id}.2"}),
        )
        assert mine.headers["x-consistency"] == "fresh"
        assert [v["appointment_id"] for v in mine.json()["items"]] == [appointment_id]
        # Several tokens at once: each of their writes (one of them not this patient's).
        several = [f"{appointment_id}.2", f"{appointment_id}.1", f"{uuid.uuid4()}.1"]
        freshness = [
            (
                await api.client.get(
                    "/v1/visits?tab=past",
                    headers=api.auth(patient, **{"X-Consistency-Token": ",".join(tokens)}),
                )
            ).headers["x-consistency"]
            for tokens in (several[:2], several)
        ]
        assert freshness == ["fresh", "stale"]
        figures = {"outsiders": len(outsiders), "requests": sent, "answers": "404, or stale"}
        record_property("figures", json.dumps(figures))
        print("other clinics:", json.dumps(figures))


def malformed(actor: dict[str, str], appointment_id: str) -> dict[str, bytes]:
    """Requests no endpoint can take; each under 64 KiB unless its name says otherwise."""
    deep = 30_000
    key = {"actor": actor, "appointment_id": appointment_id}
    return {
        "random bytes": os.urandom(2048),
        "random bytes, exactly 64 KiB": os.urandom(64 * 1024),
        "NUL bytes": b"\x00" * 64,
        "invalid UTF-8 in a string": b'{"actor": "\xff\xfe"}',
        "invalid UTF-8 in the reason": json.dumps(key).encode()[:-1] + b', "reason": "\xff\xfe"}',
        "nested arrays": b"[" * deep + b"]" * deep,
        "nested objects": b'{"a":' * (deep // 3) + b"1" + b"}" * (deep // 3),
        "nesting in a field": b'{"actor": ' + b"[" * deep + b"]" * deep + b"}",
        "huge integer": b'{"limit": 1' + b"0" * 4000 + b"}",
        "huge float": b'{"limit": 1e400, "expected_version": -1e400}',
        "NUL in the reason": json.dumps(key | {"reason": "a\u0000b"}).encode(),
        "NUL in the idempotency key": json.dumps(key | {"idempotency_key": "\u0000"}).encode(),
        "over 64 KiB": json.dumps(key | {"reason": "x" * 64 * 1024}).encode(),
        "1.5 MiB": os.urandom(1536 * 1024),
        "almost the server's max_payload": b"{" * (MAX_PAYLOAD - 4096),
    }


async def test_malformed_and_oversized_nats_requests_get_error_replies(
    api: Api, nats_url: str, record_property: pytest.RecordProperty
) -> None:
    patient = api.principal("patient")
    appointment_id = (await book(api, api.auth(patient), patient.id)).rsplit("/", 1)[1]
    actor = {"id": str(patient.id), "role": "patient", "clinic_id": str(patient.clinic_id)}
    key = json.dumps({"appointment_id": appointment_id, "actor": actor}).encode()
    nc = await nats.connect(nats_url)
    try:
        answers: Counter[int] = Counter()
        for subject in (CMD_SCHEDULE, CMD_CANCEL, CMD_START, QUERY_GET, QUERY_VISITS):
            for name, data in malformed(actor, appointment_id).items():
                reply = await nc.request(subject, data, timeout=10)
                status = int((reply.headers or {}).get("Nats-Service-Error-Code", 200))
                assert status in (400, 413), (subject, name, status, reply.data[:300])
                assert (status == 413) == (len(data) > 64 * 1024), (subject, name)
                doc = json.loads(reply.data)
                assert doc["status"] == status, doc
                answers[status] += 1
        # The service keeps answering; the appointment is untouched.
        assert json.loads((await nc.request(QUERY_GET, key, timeout=10)).data)["version"] == 1
        assert (await nc.request("$SRV.PING.appointments", b"", timeout=5)).data
        figures = {"requests": answers.total(), "answers": dict(answers)}
        record_property("figures", json.dumps(figures))
        print("malformed NATS requests:", json.dumps(figures))
    finally:
        await nc.close()


async def raw_nats(nats_url: str, frames: bytes, until: bytes) -> bytes:
    """What the server sends a raw client that sends ``frames``, read until ``until`` (10 s
    at most): frames no nats-py client would write."""
    host, port = nats_url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"headers":true,"protocol":1}\r\n' + frames)
        writer.write(b"PING\r\n")
        seen = b""
        async with asyncio.timeout(10):
            while until not in seen:
                chunk = await reader.read(65536)
                assert chunk, seen
                seen += chunk
        return seen
    finally:
        writer.close()


#: A header block shorter than ``NATS/1.0`` and a reply subject that is not UTF-8: nats-py
#: raised on each out of its read loop, which stopped reading (the process deaf to NATS).
SHORT_HEADERS = b"\r\n\r\n"


async def test_a_request_nats_py_cannot_read_leaves_the_service_listening(
    api: Api, nats_url: str
) -> None:
    patient = api.principal("patient")
    appointment_id = (await book(api, api.auth(patient), patient.id)).rsplit("/", 1)[1]
    actor = {"id": str(patient.id), "role": "patient", "clinic_id": str(patient.clinic_id)}
    key = json.dumps({"appointment_id": appointment_id, "actor": actor}).encode()
    size = len(SHORT_HEADERS)
    short = f"SUB _INBOX.raw 1\r\nHPUB {QUERY_GET} _INBOX.raw {size} {size + 2}\r\n".encode()
    short += SHORT_HEADERS + b"{}\r\n"
    answer = await raw_nats(nats_url, short, until=b"invalid-request")
    assert b"headers are malformed" in answer, answer
    not_utf8 = f"PUB {QUERY_GET} ".encode() + b"\xff\xfe" + f" {len(key)}\r\n".encode() + key
    await raw_nats(nats_url, not_utf8 + b"\r\n", until=b"PONG")
    nc = await nats.connect(nats_url)
    try:
        for _ in range(3):  # answered at once, not after ~15 s of a reconnect
            reply = await nc.request(QUERY_GET, key, timeout=2)
            assert json.loads(reply.data)["version"] == 1, reply.data
    finally:
        await nc.close()


def envelope(type_: str, data: bytes) -> bytes:
    head = {
        "event_id": str(uuid.uuid4()),
        "type": type_,
        "schema_version": 2,
        "stream_id": str(uuid.uuid4()),
        "stream_version": 1,
        "global_position": 1,
        "occurred_at": "2030-01-01T10:00:00Z",
    }
    return json.dumps(head).encode()[:-1] + b', "data": ' + data + b"}"


async def test_poison_on_the_stream_is_parked_and_the_projector_keeps_going(
    api: Api, nats_url: str, database_url: str, record_property: pytest.RecordProperty
) -> None:
    deep = 20_000
    poison = [
        b"\xff not json {",
        b"",
        envelope("AppointmentScheduled", b'{"clinic_id": "not a uuid"}'),
        envelope("AppointmentScheduled", b'{"x": ' + b"[" * deep + b"]" * deep + b"}"),
        envelope("AppointmentScheduled", b'{"visit_reason": "\xff\xfe"}'),
    ]
    unknown = envelope("AppointmentRescheduled", b'{"to": "tomorrow"}')  # skipped, not parked
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_events_stream(js)  # as the service does at start, maybe not yet done
        subject = event_subject(api.clinic_id, uuid.uuid4(), "scheduled")
        size = len(SHORT_HEADERS)
        unreadable = f"HPUB {subject} {size} {size + 2}\r\n".encode() + SHORT_HEADERS + b"{}\r\n"
        await raw_nats(nats_url, unreadable, until=b"PONG")  # the first: nothing before it
        not_utf8 = f"{subject.rsplit('.', 2)[0]}.".encode() + b"\xff\xfe.scheduled"
        await raw_nats(nats_url, b"PUB " + not_utf8 + b" 2\r\n{}\r\n", until=b"PONG")
        for data in [*poison, unknown]:
            await js.publish(event_subject(api.clinic_id, uuid.uuid4(), "scheduled"), data)
        # A booking after the poison: the projector must get past it to list the visit.
        patient = api.principal("patient")
        location = await book(api, api.auth(patient), patient.id, minutes=120)
        token = f"{location.rsplit('/', 1)[1]}.1"
        visits = await api.client.get(
            "/v1/visits", headers=api.auth(patient, **{"X-Consistency-Token": token})
        )
        assert visits.headers["x-consistency"] == "fresh", "the read missed its write"
        assert [f"/v1/appointments/{v['appointment_id']}" for v in visits.json()["items"]] == [
            location
        ]
        async with asyncio.timeout(15):  # nothing is left pending or unacknowledged
            while True:
                with contextlib.suppress(NotFoundError):
                    info = await js.consumer_info(EVENTS_STREAM, CONSUMER)
                    if info.num_pending == 0 and info.num_ack_pending == 0:
                        break
                await asyncio.sleep(0.05)
    finally:
        await nc.close()
    conn = await asyncpg.connect(database_url)
    try:
        parked = await conn.fetch("SELECT stream_sequence, deliveries FROM parked_messages")
        # The projector itself got past the poison (a read could repair its row without it):
        # it applied the booking, the stream's ninth message.
        checkpoint = await conn.fetchval(
            "SELECT stream_sequence FROM projection_checkpoints WHERE projection = $1", CONSUMER
        )
    finally:
        await conn.close()
    assert checkpoint is not None and checkpoint >= 9, checkpoint
    assert sorted(row["stream_sequence"] for row in parked) == [1, 2, 3, 4, 5, 6, 7], parked
    assert all(row["deliveries"] == 1 for row in parked), parked
    figures = {"poison": len(poison) + 2, "parked": len(parked), "max deliveries": 1, "skipped": 1}
    record_property("figures", json.dumps(figures))
    print("poison:", json.dumps(figures))
