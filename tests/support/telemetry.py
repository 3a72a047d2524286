"""Recording the services' spans in a test, in this process.

OpenTelemetry lets a process set its global tracer provider once, so this installs one
for the whole test process (each pytest-xdist worker is one): a provider whose tracers
are the OpenTelemetry SDK's while a test records (:func:`recorded_spans`) and the API's
no-op tracer otherwise — tests that do not record see the services exactly as an
unconfigured deployment runs them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_lock = threading.Lock()
_recorder: _Recorder | None = None


class _Recorder:
    def __init__(self) -> None:
        self.on = False
        self.exporter = InMemorySpanExporter()
        self.sdk = SdkTracerProvider(resource=Resource.create({"service.name": "clinic-tests"}))
        self.sdk.add_span_processor(SimpleSpanProcessor(self.exporter))


class _SwitchedTracer(trace.Tracer):
    def __init__(self, recorder: _Recorder, sdk: trace.Tracer) -> None:
        self._recorder = recorder
        self._sdk = sdk
        self._noop = trace.NoOpTracer()

    def _current(self) -> trace.Tracer:
        return self._sdk if self._recorder.on else self._noop

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._current().start_span(*args, **kwargs)

    @contextmanager  # type: ignore[override]
    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[trace.Span]:
        with self._current().start_as_current_span(*args, **kwargs) as span:
            yield span


class _SwitchedProvider(trace.TracerProvider):
    def __init__(self, recorder: _Recorder) -> None:
        self._recorder = recorder

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _SwitchedTracer(self._recorder, self._recorder.sdk.get_tracer(*args, **kwargs))


def _installed() -> _Recorder:
    global _recorder
    with _lock:
        if _recorder is None:
            recorder = _Recorder()
            trace.set_tracer_provider(_SwitchedProvider(recorder))
            if not isinstance(trace.get_tracer_provider(), _SwitchedProvider):
                raise RuntimeError("another global tracer provider is installed")
            _recorder = recorder
        return _recorder


@contextmanager
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    """Spans end into the yielded exporter while inside (one test at a time)."""
    recorder = _installed()
    recorder.exporter.clear()
    recorder.on = True
    try:
        yield recorder.exporter
    finally:
        recorder.on = False
        recorder.exporter.clear()


def spans_of_trace(exporter: InMemorySpanExporter, trace_id: int) -> Sequence[ReadableSpan]:
    """The finished spans of one trace."""
    return [
        span
        for span in exporter.get_finished_spans()
        if span.context is not None and span.context.trace_id == trace_id
    ]
