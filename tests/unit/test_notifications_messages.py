"""Titles and bodies: times as the appointment's timezone shows them, and who cancelled."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from services.notifications import messages

STARTS_AT = datetime(2030, 1, 15, 14, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("at", "zone", "shown"),
    [
        (STARTS_AT, "Europe/Berlin", "Tue 15 Jan 2030 at 15:00 CET"),
        (STARTS_AT, "America/New_York", "Tue 15 Jan 2030 at 09:00 EST"),
        (STARTS_AT, "Asia/Tokyo", "Tue 15 Jan 2030 at 23:00 JST"),
        (STARTS_AT, "Pacific/Auckland", "Wed 16 Jan 2030 at 03:00 NZDT"),
        (datetime(2030, 7, 1, 8, 30, tzinfo=UTC), "Europe/Berlin", "Mon 1 Jul 2030 at 10:30 CEST"),
        (STARTS_AT, "UTC", "Tue 15 Jan 2030 at 14:00 UTC"),
    ],
)
def test_times_are_shown_on_the_wall_clock_of_the_appointments_zone(
    at: datetime, zone: str, shown: str
) -> None:
    assert messages.local_time(at, zone) == shown


def test_a_confirmation_speaks_to_the_patient_and_to_the_provider_differently() -> None:
    patient = messages.confirmed("patient", STARTS_AT, "Europe/Berlin", 30)
    provider = messages.confirmed("provider", STARTS_AT, "Europe/Berlin", 30)
    assert patient == (
        "Visit confirmed",
        "Your video visit is booked for Tue 15 Jan 2030 at 15:00 CET (30 min).",
    )
    assert provider[0] == "New visit booked"
    assert "15:00 CET" in provider[1]


@pytest.mark.parametrize(
    ("role", "by", "own", "body"),
    [
        ("patient", "patient", True, "You cancelled your video visit"),
        ("provider", "patient", False, "The patient cancelled the video visit"),
        ("patient", "provider", False, "Your provider cancelled your video visit"),
        ("patient", "staff", False, "The clinic cancelled your video visit"),
        ("provider", "staff", False, "The clinic cancelled the video visit"),
    ],
)
def test_a_cancellation_notice_says_by_whom(role: str, by: str, own: bool, body: str) -> None:
    title, text = messages.cancelled(role, by, own, STARTS_AT, "Europe/Berlin")  # type: ignore[arg-type]
    assert title == "Visit cancelled"
    assert text == f"{body} of Tue 15 Jan 2030 at 15:00 CET."


def test_reminders_state_the_local_time() -> None:
    assert (
        "15:00 CET"
        in messages.reminder_24h(STARTS_AT, "Europe/Berlin", STARTS_AT - timedelta(hours=24))[1]
    )
    title, body = messages.visit_ready(STARTS_AT, "Europe/Berlin")
    assert title == "Your visit can start now"
    assert "15:00 CET" in body


def test_a_zone_this_process_does_not_know_names_the_time_in_utc_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="services.notifications.messages"):
        for _ in range(3):
            shown = messages.local_time(STARTS_AT, "Atlantis/Lost_City_Again")
            assert shown == "Tue 15 Jan 2030 at 14:00 UTC"
            title, _ = messages.reminder_24h(STARTS_AT, "Atlantis/Lost_City_Again", STARTS_AT)
            assert title == "Visit today"
    assert len(caplog.records) == 1, caplog.text
