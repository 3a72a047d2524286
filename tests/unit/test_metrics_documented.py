"""docs/operations.md's table of metrics and the alerts under it name the metrics the code
exports, with their types and labels, and every metric of ours is in the table."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import services.appointments.entrypoints.nats.service
import services.metrics

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
_ROW = re.compile(r"^\| `(clinic_\w+)` \| (\w+) \| ([^|]*) \|", re.MULTILINE)


def _ours() -> dict[str, tuple[str, set[str]]]:
    """name as written in the docs (counters with ``_total``) → (type, label names)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for module in (services.metrics, services.appointments.entrypoints.nats.service):
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                (family,) = value.describe()
                name = family.name + ("_total" if family.type == "counter" else "")
                found[name] = (family.type, set(value._labelnames))  # (no public accessor)
    return found


def test_the_table_of_metrics_is_the_code_s() -> None:
    documented = {
        name: (kind, set(re.findall(r"`(\w+)`", labels)))
        for name, kind, labels in _ROW.findall(OPERATIONS.read_text())
    }
    ours = _ours()
    assert set(documented) == set(ours)
    for name, (kind, labels) in documented.items():
        assert kind == ours[name][0], name
        assert labels == ours[name][1], name


def test_the_alerts_name_only_metrics_that_exist() -> None:
    text = OPERATIONS.read_text()
    alerts = text[text.index("Alerts worth setting") :]
    named = set(re.findall(r"\b(clinic_\w+)", alerts))
    assert named and named <= set(_ours())


def test_the_series_the_alerts_count_exist_at_0_before_the_first() -> None:
    """``increase()``/``rate()`` miss the first count of a series that appears with it."""
    from services.appointments.domain.rules import Rules
    from services.appointments.service_layer.handlers import Appointments
    from tests.support.fakes import FakeEventStore

    store = FakeEventStore()
    Appointments(store, store, lambda: datetime.now(UTC), uuid.uuid4, Rules())
    for command in ("schedule", "cancel", "start", "get"):
        labels = {"command": command, "outcome": "unavailable"}
        assert REGISTRY.get_sample_value("clinic_commands_total", labels) is not None, command
