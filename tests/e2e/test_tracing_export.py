"""``clinic appointments`` exports its spans over OTLP/HTTP when ``OTEL_*`` asks for it,
and flushes them when it stops on SIGTERM.

The collector is a tiny OTLP/HTTP receiver run by the test (``http.server`` in a thread),
decoding each ``ExportTraceServiceRequest``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from services.auth import mint_token
from tests.e2e.conftest import free_port, wait_until_live
from tests.support.processes import REPO, clinic_command

SECRET = "otlp-test-secret-that-is-long-enough-for-hs256"


class Collector:
    """What the receiver got: (service.name, span name, trace id, parent span id, span id)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, int, int, int]] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()

    def add(self, path: str, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            self.paths.append(path)
            for resource_spans in request.resource_spans:
                attributes = {
                    a.key: a.value.string_value for a in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append(
                            (
                                attributes.get("service.name", ""),
                                span.name,
                                int.from_bytes(span.trace_id, "big"),
                                int.from_bytes(span.parent_span_id or b"\0", "big"),
                                int.from_bytes(span.span_id, "big"),
                            )
                        )


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[int, Collector]]:
    collector = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            collector.add(self.path, body)
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], collector
    finally:
        server.shutdown()
        server.server_close()


async def test_spans_are_exported_over_otlp_and_flushed_on_sigterm(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    trace_id, caller_span = random.getrandbits(128) | 1, random.getrandbits(64) | 1
    port = free_port()
    log = tmp_path / "appointments.log"
    with otlp_receiver() as (otlp_port, collector):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            "PYTHONPATH": str(REPO),
            "CLINIC_DATABASE_URL": database_url,
            "CLINIC_NATS_URL": nats_url,
            "CLINIC_HTTP_PORT": str(port),
            "CLINIC_JWT_SECRET": SECRET,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            # Nothing is exported before the exit: the spans arrive by the final flush.
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
        }
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                *clinic_command("appointments"),
                env=env,
                cwd=REPO,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=output,
            )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                await wait_until_live(client, 20)
                me, clinic_id = uuid.uuid4(), uuid.uuid4()
                token = mint_token(SECRET, "patient", me, clinic_id)
                created = await client.post(
                    "/v1/appointments",
                    headers={
                        "Authorization": f"Bearer {token}",
                        "traceparent": f"00-{trace_id:032x}-{caller_span:016x}-01",
                    },
                    json={
                        "patient_id": str(me),
                        "provider_id": str(uuid.uuid4()),
                        "starts_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
                        "duration_minutes": 30,
                        "timezone": "UTC",
                    },
                )
                assert created.status_code == 201, created.text
            # Until the relay published the event (its span is then ended).
            conn = await asyncpg.connect(database_url)
            try:
                async with asyncio.timeout(20):
                    while True:
                        if not await conn.fetchval("SELECT EXISTS (SELECT FROM outbox)"):
                            break
                        await asyncio.sleep(0.05)
            finally:
                await conn.close()
            assert collector.spans == []  # all still in the batch processor
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await process.wait()
            assert process.returncode == 0, log.read_text(errors="replace")[-3000:]
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert collector.paths and set(collector.paths) == {"/v1/traces"}
    ours = {
        name: (service, parent, span)
        for service, name, t, parent, span in collector.spans
        if t == trace_id
    }
    assert {"POST /v1/appointments", "publish APPOINTMENTS"} <= set(ours), collector.spans
    assert {service for service, _, _ in ours.values()} == {"clinic-appointments"}
    server, producer = ours["POST /v1/appointments"], ours["publish APPOINTMENTS"]
    assert server[1] == caller_span and producer[1] == server[2]


#: A process that makes ten spans and exits, timing the flush at its exit.
TEN_SPANS_THEN_EXIT = """
import time
from opentelemetry import trace
from services.telemetry import process_tracing

with process_tracing("clinic-test"):
    tracer = trace.get_tracer("test")
    for _ in range(10):
        with tracer.start_as_current_span("work"):
            pass
    leaving = time.monotonic()
print(f"flushed in {time.monotonic() - leaving:.1f}s")
"""


def test_a_collector_that_never_answers_holds_the_exit_5_seconds_at_most() -> None:
    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never answers
        accepting = threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True)
        accepting.start()
        env = {
            **os.environ,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{listener.getsockname()[1]}",
        }
        result = subprocess.run(
            [sys.executable, "-c", TEN_SPANS_THEN_EXIT],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        for connection in held:
            connection.close()
    assert result.returncode == 0, result.stderr
    assert "spans not flushed within 5s" in result.stderr
    seconds = float(result.stdout.split()[-1].rstrip("s"))
    assert seconds < 7.5, result.stdout  # the exporter's own time-outs: ~10 s
