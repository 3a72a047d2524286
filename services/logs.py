"""Structured JSON logs on stderr, one object per line."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from services.tracing import current_correlation

#: LogRecord attributes that are not extra fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        correlation = current_correlation.get()
        if correlation is not None:
            entry["correlation_id"] = str(correlation)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry, enc_hook=str).decode()


#: What uvicorn logs (at WARNING) for any client's malformed or unwanted request: one
#: unauthenticated client could fill the logs with them.
CLIENT_CAUSED: Final = (
    "Invalid HTTP request received.",
    "Unsupported upgrade request.",
    "No supported WebSocket library detected. Please use \"pip install 'uvicorn[standard]'\","
    " or install 'websockets' or 'wsproto' manually.",
    "Exceeded concurrency limit.",
)


class Throttle(logging.Filter):
    """Lets one record of each of ``messages`` (every message: None) through per
    ``interval`` seconds and holds back the others; the next one let through says how many
    were held back (``suppressed``). With ``per_first_argument``, records of one message
    with another first argument (a cause among a few) are throttled apart. Other records
    pass untouched."""

    def __init__(
        self,
        messages: Iterable[str] | None,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        per_first_argument: bool = False,
    ) -> None:
        super().__init__()
        self._messages = None if messages is None else frozenset(messages)
        self._interval = interval
        self._clock = clock
        self._per_first_argument = per_first_argument
        #: message (and first argument) → (when one was last let through, how many held
        #: back since)
        self._seen: dict[object, tuple[float | None, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if not isinstance(message, str):
            return True
        if self._messages is not None and message not in self._messages:
            return True
        key: object = message
        if self._per_first_argument and isinstance(record.args, tuple) and record.args:
            key = (message, record.args[0])
        now = self._clock()
        last, held = self._seen.get(key, (None, 0))
        if last is not None and now - last < self._interval:
            self._seen[key] = (last, held + 1)
            return False
        if held:
            record.suppressed = held
        self._seen[key] = (now, 0)
        return True


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as JSON at ``level``, library warnings included
    (PyJWT's InsecureKeyLengthWarning, say: a JSON line, not raw text on stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    throttle_client_noise()
    throttle_trace_state_noise()


#: OpenTelemetry's loggers of what it makes of a request's ``traceparent`` and
#: ``tracestate`` headers (malformed, too long): a client's to write.
TRACE_HEADER_LOGGERS: Final = (
    "opentelemetry.trace.span",
    "opentelemetry.trace.propagation.tracecontext",
)


def throttle_trace_state_noise() -> None:
    """OpenTelemetry's warnings about a request's trace headers (a line per request
    otherwise) said once a minute each."""
    for name in TRACE_HEADER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Throttle) for f in logger.filters):
            logger.addFilter(Throttle(None))


def throttle_client_noise() -> Throttle:
    """Let uvicorn's warnings about clients' requests (:data:`CLIENT_CAUSED`) through once
    a minute each, with how many were held back; the filter, which replaces an earlier one."""
    server = logging.getLogger("uvicorn.error")
    for old in [f for f in server.filters if isinstance(f, Throttle)]:
        server.removeFilter(old)
    throttle = Throttle(CLIENT_CAUSED)
    server.addFilter(throttle)
    return throttle


#: An answer ``503 unavailable`` over HTTP or NATS, said at most once a minute for each
#: reason (the answer's detail: unreachable, busy, refusing…) with the count held back
#: (``suppressed``): an outage of PostgreSQL turns every request into one.
ANSWERED_UNAVAILABLE: Final = "answered 503 unavailable: %s (cause: %r)"
_answers = logging.getLogger("services.unavailable")
_answers.addFilter(Throttle([ANSWERED_UNAVAILABLE], per_first_argument=True))


def answered_unavailable(detail: str, cause: BaseException | None) -> None:
    """Say (throttled) that a request was answered ``503 unavailable``, and why."""
    _answers.warning(ANSWERED_UNAVAILABLE, detail, cause)


#: A NATS message dropped for where it came from or is to go (a request whose reply subject
#: is no inbox; on a consumer's inbox, a message JetStream did not deliver for that
#: consumer): said at most once a minute for each kind, with the count held back
#: (``suppressed``): a client may send any number.
DROPPED_MESSAGE: Final = "dropped a NATS message %s: %s"
_dropped = logging.getLogger("services.dropped")
_dropped.addFilter(Throttle([DROPPED_MESSAGE], per_first_argument=True))


def dropped_message(kind: str, detail: str) -> None:
    """Say (throttled) that a NATS message of ``kind`` was dropped unhandled."""
    _dropped.warning(DROPPED_MESSAGE, kind, detail)
