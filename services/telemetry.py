"""Trace export: an OpenTelemetry SDK set up from the standard ``OTEL_*`` variables.

Nothing is exported unless asked for: without configuration the OpenTelemetry API's no-op
provider stays in place (spans cost next to nothing, see :mod:`services.tracing`). Export
is asked for by

* ``OTEL_TRACES_EXPORTER``: ``otlp`` (OTLP over HTTP/protobuf) and/or ``console``
  (comma-separated; ``none``: nothing), or
* ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (OTLP);

``OTEL_SDK_DISABLED=true`` wins over both. The process then installs an SDK tracer
provider (a batch span processor per exporter; ``service.name`` from
``OTEL_SERVICE_NAME``, else the process's default) and flushes it when it exits. The SDK
and the exporter come with the ``otel`` extra; asked for without them, the process logs
one error and runs untraced.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger(__name__)

EXPORTERS: Final = ("otlp", "console")
#: The only OTLP protocol the ``otel`` extra ships an exporter for.
OTLP_PROTOCOL: Final = "http/protobuf"
#: How long the flush at exit may take, all told.
SHUTDOWN_TIMEOUT_MILLIS: Final = 5000


@dataclass(frozen=True)
class TracingPlan:
    """What the ``OTEL_*`` variables ask of this process."""

    service_name: str
    exporters: tuple[str, ...] = ()
    problems: list[str] = field(default_factory=list)
    """Settings that were ignored, one line each (logged as errors)."""

    @property
    def exporting(self) -> bool:
        """Whether an SDK is to be set up."""
        return bool(self.exporters)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def tracing_plan(env: Mapping[str, str], default_service_name: str) -> TracingPlan:
    """Read the ``OTEL_*`` variables of ``env`` (no side effect)."""
    service_name = env.get("OTEL_SERVICE_NAME", "").strip() or default_service_name
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return TracingPlan(service_name)
    problems: list[str] = []
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        requested = [name.strip() for name in named.split(",") if name.strip()]
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        requested = ["otlp"]
    else:
        requested = []
    exporters: list[str] = []
    for name in requested:
        if name == "none":
            continue
        if name not in EXPORTERS:
            problems.append(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported (choose from "
                f"{', '.join(EXPORTERS)} or none); it is ignored"
            )
            continue
        if name == "otlp":
            protocol = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or OTLP_PROTOCOL
            ).strip()
            if protocol != OTLP_PROTOCOL:
                problems.append(
                    f"OTLP protocol {protocol!r} is not supported (only {OTLP_PROTOCOL}); "
                    "spans are not exported over OTLP"
                )
                continue
        if name not in exporters:
            exporters.append(name)
    return TracingPlan(service_name, tuple(exporters), problems)


SDK_MISSING: Final = (
    "trace export is configured (OTEL_* variables) but the OpenTelemetry SDK is not "
    "installed: install clinic-appointments[otel]; running untraced"
)


def install_tracing(plan: TracingPlan) -> Callable[[], None] | None:
    """Set up the SDK tracer provider ``plan`` asks for as the global one; the function
    that flushes and shuts it down, or ``None`` when nothing was set up."""
    for problem in plan.problems:
        log.error("tracing: %s", problem)
    if not plan.exporting:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )

        exporters: list[SpanExporter] = []
        for name in plan.exporters:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                exporters.append(OTLPSpanExporter())
            else:
                exporters.append(ConsoleSpanExporter())
    except ImportError:
        log.error("tracing: %s", SDK_MISSING)
        return None
    from opentelemetry import trace

    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: plan.service_name}), shutdown_on_exit=False
    )
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info(
        "tracing: exporting spans",
        extra={"service_name": plan.service_name, "exporters": list(plan.exporters)},
    )

    def flush_and_shut_down() -> None:
        try:
            provider.force_flush(SHUTDOWN_TIMEOUT_MILLIS)
            provider.shutdown()
        except Exception as exc:  # an exporter failing at exit must not fail the exit
            log.warning("tracing: flushing spans at exit failed: %r", exc)

    def shutdown() -> None:
        # The exporter's own time-outs and retries (a collector that accepts and never
        # answers holds the flush and then the shut-down ~5 s each) do not bound it: a
        # thread does, which the process leaves behind when it exits.
        flushing = threading.Thread(target=flush_and_shut_down, name="span-flush", daemon=True)
        flushing.start()
        flushing.join(SHUTDOWN_TIMEOUT_MILLIS / 1000)
        if flushing.is_alive():
            log.warning(
                "tracing: spans not flushed within %.0fs (the collector does not answer):"
                " exiting without them",
                SHUTDOWN_TIMEOUT_MILLIS / 1000,
            )

    return shutdown


@contextmanager
def process_tracing(
    default_service_name: str, env: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Trace export for the process inside the block, as the ``OTEL_*`` variables ask;
    spans not yet exported are flushed when it ends."""
    shutdown = install_tracing(
        tracing_plan(os.environ if env is None else env, default_service_name)
    )
    try:
        yield
    finally:
        if shutdown is not None:
            shutdown()
