"""Prometheus metrics that matter for running the service (served on ``GET /metrics``).

Defined once here so every module and docs/operations.md use the same names.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Final, Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from services.errors import ClinicError

COMMANDS = Counter(
    "clinic_commands_total",
    "Commands and queries handled, by name and outcome (ok, or the error code).",
    ["command", "outcome"],
)
COMMAND_SECONDS = Histogram(
    "clinic_command_duration_seconds",
    "Time to handle a command or query in the application layer.",
    ["command"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
COMMAND_RETRIES = Counter(
    "clinic_command_conflict_retries_total",
    "Commands decided again after losing an optimistic-concurrency race.",
    registry=None,
)
VIEW_REPAIR_FAILURES = Counter(
    "clinic_visits_repair_failures_total",
    "Reads ahead of the visits view whose row could not be written from the event store"
    " (they wait for the projector).",
    registry=None,
)
RELAY_PUBLISHED = Counter(
    "clinic_relay_published_total",
    "Events the relay published and JetStream acknowledged.",
    registry=None,
)
RELAY_DUPLICATES = Counter(
    "clinic_relay_duplicates_total",
    "Of the events published, those JetStream had stored already (sent again after a relay"
    " crash or a lost ack; de-duplicated by Nats-Msg-Id, not stored twice).",
    registry=None,
)
RELAY_BACKLOG = Gauge(
    "clinic_relay_backlog_events",
    "Committed events not yet published (outbox rows, counted up to a relay batch).",
    registry=None,
)
RELAY_LAG_SECONDS = Gauge(
    "clinic_relay_lag_seconds",
    "Age of the oldest committed event not yet published.",
    registry=None,
)
PROJECTOR_EVENTS = Counter(
    "clinic_projector_events_total",
    "Events the visits projector handled, by outcome.",
    ["outcome"],
)
PROJECTOR_LAG_SECONDS = Gauge(
    "clinic_projector_lag_seconds",
    "Time between an event's occurrence and the projector handling it (the last event"
    " handled, whatever came of it; 0 once the consumer has nothing pending).",
    registry=None,
)
CONSUMER_REDELIVERIES = Counter(
    "clinic_consumer_redeliveries_total",
    "JetStream messages received more than once, by consumer.",
    ["consumer"],
)
HTTP_REQUESTS = Counter(
    "clinic_http_requests_total",
    "HTTP requests answered, by method, route (the path template) and status.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "clinic_http_request_duration_seconds",
    "Time from an HTTP request's receipt to the end of its answer, by method and route.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
DB_POOL_CONNECTIONS = Gauge(
    "clinic_db_pool_connections",
    "Connections of a PostgreSQL pool of this process: busy (running a query or held) or"
    " idle (open, free), read at each scrape.",
    ["pool", "state"],
)
DB_POOL_MAX = Gauge(
    "clinic_db_pool_max_connections",
    "The most connections a PostgreSQL pool of this process opens.",
    ["pool"],
)
NOTIFICATIONS = Counter(
    "clinic_notifications_total",
    "Notification deliveries, by kind, channel and result.",
    ["kind", "channel", "result"],
)
NOTIFICATIONS_LAG_SECONDS = Gauge(
    "clinic_notifications_lag_seconds",
    "Time between an event's occurrence and the notification service handling it (the"
    " oldest being handled, else the last handled; 0 once the consumer has nothing pending).",
    registry=None,
)
NOTIFICATION_PARKED = Counter(
    "clinic_notification_parked_messages_total",
    "Events the notification service gave up on and kept in notification_parked_messages.",
    registry=None,
)


# The metrics above made with ``registry=None`` belong to one role and have no labels:
# registered at import they would read 0 in every process whatever its roles (a relay lag of
# 0 from the api and notification pods, a healthy graph while no relay runs). Each is
# exported from the start of the part that counts it (:func:`exported`).
RELAY_METRICS: Final = (RELAY_PUBLISHED, RELAY_DUPLICATES, RELAY_BACKLOG, RELAY_LAG_SECONDS)

_exported: set[MetricWrapperBase] = set()


def exported(*metrics: MetricWrapperBase) -> None:
    """Serve ``metrics`` on ``/metrics`` from now on (once each, however often asked)."""
    for metric in metrics:
        if metric not in _exported:
            REGISTRY.register(metric)
            _exported.add(metric)


def watch_pool(name: str, pool: PoolSizes) -> None:
    """Report ``pool``'s connections as ``pool=name`` from now on (read at each scrape, 0
    once the pool is gone; a pool watched later under the same name takes its place)."""
    watched = weakref.ref(pool)

    def busy() -> int:
        live = watched()
        return 0 if live is None else live.get_size() - live.get_idle_size()

    def idle() -> int:
        live = watched()
        return 0 if live is None else live.get_idle_size()

    DB_POOL_CONNECTIONS.labels(name, "busy").set_function(busy)
    DB_POOL_CONNECTIONS.labels(name, "idle").set_function(idle)
    DB_POOL_MAX.labels(name).set(pool.get_max_size())


class PoolSizes(Protocol):
    """What :func:`watch_pool` reads of an asyncpg pool."""

    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...
    def get_max_size(self) -> int: ...


def zeroed(counter: Counter, *label_sets: tuple[str, ...]) -> None:
    """Export ``counter``'s series of ``label_sets`` at 0 from now on: Prometheus's
    ``increase()`` does not see the first count of a series that appears with it."""
    for labels in label_sets:
        counter.labels(*labels)


@contextmanager
def observe_command(name: str) -> Iterator[None]:
    """Count the outcome and time of one command or query."""
    started = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except ClinicError as exc:
        outcome = exc.code.value
        raise
    except BaseException:
        outcome = "error"
        raise
    finally:
        _seconds_of(name).observe(time.perf_counter() - started)
        _count_of(name, outcome).inc()


@cache
def _seconds_of(name: str) -> Histogram:
    return COMMAND_SECONDS.labels(name)


@cache
def _count_of(name: str, outcome: str) -> Counter:
    return COMMANDS.labels(name, outcome)
