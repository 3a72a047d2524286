"""The ``clinic`` processes as an operator runs them: start, serve, stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from services.embedded import EmbeddedNats
from tests.e2e.conftest import free_port, wait_until_live, wait_until_ready

SECRET = "cli-test-secret-that-is-long-enough-for-hs256"


def clinic(*args: str) -> list[str]:
    return [sys.executable, "-c", "from services.cli import main; main()", *args]


def env_for(database_url: str, nats_url: str, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "CLINIC_DATABASE_URL": database_url,
        "CLINIC_NATS_URL": nats_url,
        "CLINIC_HTTP_PORT": str(port),
        "CLINIC_JWT_SECRET": SECRET,
    }


async def stop(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(process.wait(), 10)
    except TimeoutError:
        process.kill()
        raise AssertionError("did not exit within 10 s of SIGTERM") from None


def test_migrate_is_repeatable_and_token_mints(database_url: str) -> None:
    env = {**os.environ, "CLINIC_DATABASE_URL": database_url, "CLINIC_JWT_SECRET": SECRET}
    again = subprocess.run(clinic("migrate"), env=env, capture_output=True, text=True, check=True)
    assert "applied 0 migration(s)" in again.stdout
    token = subprocess.run(
        clinic(
            "token", "--role", "staff", "--sub", str(uuid.uuid4()), "--clinic", str(uuid.uuid4())
        ),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert token.count(".") == 2


def test_commands_refuse_missing_configuration_clearly() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    result = subprocess.run(clinic("migrate"), env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "CLINIC_DATABASE_URL" in result.stderr
    bad = subprocess.run(
        clinic("appointments", "--roles", "api,nope"),
        env={**env, "CLINIC_DATABASE_URL": "x"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr


@pytest.mark.parametrize("command", [("appointments",), ("notifications",)])
async def test_service_serves_then_exits_0_on_sigterm(
    database_url: str, nats_url: str, command: tuple[str, ...]
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *clinic(*command),
        env=env_for(database_url, nats_url, port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await wait_until_live(client, 20)
            await wait_until_ready(client)  # NATS answers too
            if command == ("appointments",):
                from services.auth import mint_token

                me, clinic_id = uuid.uuid4(), uuid.uuid4()
                token = mint_token(SECRET, "patient", me, clinic_id)
                starts = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
                created = await client.post(
                    "/v1/appointments",
                    headers={"Authorization": f"Bearer {token}"},
                    json={
                        "patient_id": str(me),
                        "provider_id": str(uuid.uuid4()),
                        "starts_at": starts,
                        "duration_minutes": 30,
                        "timezone": "UTC",
                    },
                )
                assert created.status_code == 201
        assert await stop(process) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("command", ["appointments", "notifications"])
async def test_nats_closing_the_connection_for_good_ends_the_service_with_exit_1(
    database_url: str, tmp_path: Path, command: str
) -> None:
    """A server that refuses the process's second subscription (``max_subscriptions: 1``)
    sends ``-ERR``, after which nats-py closes the connection for good: the service stops
    and exits 1 in one line, for its supervisor to start it again, instead of staying live
    and never ready."""
    (tmp_path / "nats.conf").write_text("max_subscriptions: 1\n")
    server = EmbeddedNats(tmp_path / "nats", extra_args=["-c", str(tmp_path / "nats.conf")])
    server.start()
    try:
        process = await asyncio.create_subprocess_exec(
            *clinic(command),
            env=env_for(database_url, server.url, free_port()),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            status = await asyncio.wait_for(process.wait(), 60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    finally:
        server.stop()
    assert process.stderr is not None
    stderr = (await process.stderr.read()).decode()
    assert status == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("clinic: NATS closed the connection for good"), stderr
    assert "maximum subscriptions exceeded" in last.lower(), stderr
    assert "Traceback" not in stderr, stderr
