"""Which trace export the ``OTEL_*`` variables ask for, and what happens without the SDK."""

from __future__ import annotations

import logging
import sys

import pytest

from services.telemetry import SDK_MISSING, TracingPlan, install_tracing, tracing_plan

DEFAULT = "clinic-appointments"


def plan(**env: str) -> TracingPlan:
    return tracing_plan(env, DEFAULT)


def test_nothing_configured_exports_nothing() -> None:
    assert plan() == TracingPlan(DEFAULT)
    assert not plan().exporting
    assert not plan(OTEL_SERVICE_NAME="x", OTEL_EXPORTER_OTLP_HEADERS="a=b").exporting


def test_exporters_by_name_or_by_endpoint() -> None:
    assert plan(OTEL_TRACES_EXPORTER="otlp").exporters == ("otlp",)
    assert plan(OTEL_TRACES_EXPORTER=" Console ").exporters == ("console",)
    assert plan(OTEL_TRACES_EXPORTER="otlp,console,otlp").exporters == ("otlp", "console")
    assert plan(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318").exporters == ("otlp",)
    assert plan(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://c:4318/v1/traces").exporters == ("otlp",)
    # A named choice wins over an endpoint.
    assert plan(OTEL_TRACES_EXPORTER="none", OTEL_EXPORTER_OTLP_ENDPOINT="http://c").exporters == ()
    assert plan(
        OTEL_TRACES_EXPORTER="console", OTEL_EXPORTER_OTLP_ENDPOINT="http://c"
    ).exporters == ("console",)


def test_the_sdk_disabled_wins() -> None:
    for value in ("true", "TRUE", " true "):
        disabled = plan(
            OTEL_SDK_DISABLED=value,
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT="http://c",
        )
        assert not disabled.exporting and not disabled.problems
    assert plan(OTEL_SDK_DISABLED="false", OTEL_TRACES_EXPORTER="otlp").exporting


def test_the_service_name_defaults_to_the_process() -> None:
    assert plan().service_name == DEFAULT
    assert plan(OTEL_SERVICE_NAME="  ").service_name == DEFAULT
    assert plan(OTEL_SERVICE_NAME="clinic-eu-1").service_name == "clinic-eu-1"
    assert tracing_plan({}, "clinic-notifications").service_name == "clinic-notifications"


def test_unsupported_choices_are_reported_and_skipped() -> None:
    unknown = plan(OTEL_TRACES_EXPORTER="zipkin,console")
    assert unknown.exporters == ("console",)
    [problem] = unknown.problems
    assert "zipkin" in problem and "otlp" in problem
    grpc = plan(OTEL_EXPORTER_OTLP_ENDPOINT="http://c", OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert grpc.exporters == () and "grpc" in grpc.problems[0]
    traces_only = plan(
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
    )
    assert traces_only.exporters == ("otlp",) and not traces_only.problems


def test_nothing_asked_sets_nothing_up(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert install_tracing(plan()) is None
    assert not caplog.records


def test_export_asked_without_the_sdk_logs_one_error_and_runs_untraced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As in an image built without the otel extra: the SDK and exporter do not import.
    for name in list(sys.modules):
        if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter")):
            monkeypatch.delitem(sys.modules, name)
    for name in ("opentelemetry.sdk", "opentelemetry.exporter"):
        monkeypatch.setitem(sys.modules, name, None)
    with caplog.at_level(logging.INFO):
        assert install_tracing(plan(OTEL_TRACES_EXPORTER="otlp")) is None
    [record] = caplog.records
    assert record.levelno == logging.ERROR and SDK_MISSING in record.getMessage()
    assert "clinic-appointments[otel]" in record.getMessage()
