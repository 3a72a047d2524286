"""JetStream streams are configured in code and created or updated when a service starts.

Only what JetStream servers since 2.9 understand is set, so the same code runs against
every server the system supports. Settings an operator changed that the code does not
manage (limits, placement…) are kept on update.
"""

from __future__ import annotations

import logging
import math
from typing import Final

import nats.errors
import nats.js.errors
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from contracts.subjects import EVENTS_STREAM, EVENTS_SUBJECTS
from services.config import ConfigError
from services.pg_errors import schema_behind

log = logging.getLogger(__name__)

#: How long JetStream remembers a ``Nats-Msg-Id``: a relay that crashed between
#: publishing and deleting its outbox rows republishes within seconds, well inside it.
DUPLICATE_WINDOW_SECONDS: Final = 300.0


def describe(exc: BaseException) -> str:
    """The type and message of a failure of a loop over JetStream and PostgreSQL (the relay,
    the projector, the notification service's consumer), for a log line: the ``repr`` of a
    nats-py APIError is an empty ``ServerError()``, its ``str`` carries the server's
    description and codes; a JetStream API that nobody answers is named as such (a server
    started without JetStream says nothing else), and a table or column the database lacks
    as a schema not migrated yet."""
    text = str(exc)
    described = f"{type(exc).__name__}: {text}" if text else repr(exc)
    if isinstance(exc, ServiceUnavailableError | NoRespondersError):
        described += (
            " (JetStream does not answer: is it enabled on the NATS server, `-js` or a"
            " `jetstream` block, and has its cluster elected a leader?)"
        )
    elif schema_behind(exc):
        described += " (the database is not migrated yet: run clinic migrate)"
    return described


class StreamConfigConflict(Exception):
    """The stream exists with a setting that cannot change in place (e.g. its storage)."""


def events_stream_config(replicas: int | None = None) -> StreamConfig:
    """``APPOINTMENTS``: every appointment event, kept (the stream is the consumers' replay
    log), file storage, de-duplicated by ``Nats-Msg-Id`` = ``event_id``.

    ``replicas=None`` creates it with the server's default (1); an existing stream is grown
    to ``replicas`` but never shrunk (see :func:`ensure_stream`).
    """
    return StreamConfig(
        name=EVENTS_STREAM,
        description="Appointment events, published from the event store's outbox.",
        subjects=[EVENTS_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )


def _differences(current: StreamConfig, wanted: StreamConfig) -> dict[str, object]:
    """The managed settings of ``wanted`` that ``current`` does not have."""
    changes: dict[str, object] = {}
    if sorted(current.subjects or []) != sorted(wanted.subjects or []):
        changes["subjects"] = wanted.subjects
    if not math.isclose(current.duplicate_window or 0, wanted.duplicate_window or 0):
        changes["duplicate_window"] = wanted.duplicate_window
    for name in ("description", "discard"):
        if getattr(wanted, name) is not None and getattr(current, name) != getattr(wanted, name):
            changes[name] = getattr(wanted, name)
    # Grown, never shrunk: a process started with the default (1) must not take the
    # replicas of an R3 stream that an operator or the cluster's configuration set up.
    if wanted.num_replicas is not None and wanted.num_replicas > (current.num_replicas or 1):
        changes["num_replicas"] = wanted.num_replicas
    for name in ("storage", "retention"):
        if getattr(current, name) != getattr(wanted, name):
            have, want = (
                getattr(v, "value", v) for v in (getattr(current, name), getattr(wanted, name))
            )
            raise StreamConfigConflict(
                f"stream {wanted.name} has {name} {have}, the code wants {want}: this cannot"
                " change in place; move its messages to a stream made anew (nats stream"
                " backup, delete, then restore with the config edited) or delete it."
            )
    return changes


#: JetStream's code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    """Create the stream ``config`` names, or update it to ``config``'s managed settings
    (its replicas only upwards).

    Safe to call from every process at start, concurrently.
    """
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            created = await js.add_stream(config)
            log.info("stream created", extra={"stream": config.name})
            return created
        except BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise  # refused for itself (no peers to place it on yet, say)
            # Another process created it first (with another config, else this succeeds).
            info = await js.stream_info(config.name)
    changes = _differences(info.config, config)
    if not changes:
        return info
    if "num_replicas" in changes and (info.cluster is None or not info.cluster.name):
        # NATS 2.9 takes this update on a server that is not clustered (and then claims
        # copies that do not exist); later servers refuse it, as every server refuses to
        # create such a stream.
        raise StreamConfigConflict(
            f"stream {config.name} cannot have {config.num_replicas} replicas: the NATS"
            " server is not clustered (CLINIC_NATS_STREAM_REPLICAS)"
        )
    updated = await js.update_stream(info.config.evolve(**changes))
    log.info("stream updated", extra={"stream": config.name, "changed": sorted(changes)})
    return updated


async def ensure_events_stream(js: JetStreamContext, replicas: int | None = None) -> StreamInfo:
    """Create or update ``APPOINTMENTS``; every service that reads it calls this at start."""
    return await ensure_stream(js, events_stream_config(replicas))


#: Refusals of the JetStream API that pass: JetStream electing its leaders (a cluster
#: starting or recovering), a request lost in a reconnect (and :data:`PASSING_CODES`).
#: Others (replicas on a server that is not clustered, a stream of another kind) are the
#: configuration's.
PASSING: Final[tuple[type[BaseException], ...]] = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
)

#: JetStream's own codes of refusals that pass: no suitable peers for placement (a
#: cluster whose last nodes are still starting), insufficient resources.
PASSING_CODES: Final = frozenset({10005, 10023})


def refusal_passes(exc: BaseException) -> bool:
    """Whether a failure to make or update a stream may go away by itself (retry it)."""
    if isinstance(exc, PASSING):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in PASSING_CODES


def stream_refused(replicas: int | None, exc: BaseException) -> ConfigError:
    """The configuration error of JetStream refusing the streams for good."""
    if isinstance(exc, StreamConfigConflict):
        return ConfigError(str(exc))
    hint = ""
    if replicas is not None and replicas > 1:
        hint = f"; {replicas} replicas need a JetStream cluster of {replicas} nodes"
    return ConfigError(
        f"JetStream refused the streams (CLINIC_NATS_URL, CLINIC_NATS_STREAM_REPLICAS="
        f"{replicas or 1}): {describe(exc)}{hint}"
    )


class EventsStream:
    """``APPOINTMENTS`` as a long-running role (the relay, the projector) makes sure of it:
    a refusal for good is fatal until the stream was made once; after that every failure is
    waited out (see :func:`ensure_events_stream_or_fail`)."""

    def __init__(self, replicas: int | None = None) -> None:
        self._replicas = replicas
        self._made = False

    async def ensure(self, js: JetStreamContext) -> StreamInfo:
        """Create or update the stream; :class:`ConfigError` if refused for good at start."""
        info = await ensure_events_stream_or_fail(js, self._replicas, fatal=not self._made)
        self._made = True
        return info


async def ensure_events_stream_or_fail(
    js: JetStreamContext, replicas: int | None = None, *, fatal: bool = True
) -> StreamInfo:
    """:func:`ensure_events_stream`; with ``fatal`` (at start), a refusal for good raised as
    a :class:`ConfigError` (the process exits 2, as ``clinic notifications`` does) instead of
    being retried forever while the service reports ready and publishes nothing. Once the
    stream was made, every failure is waited out (a cluster in a rolling restart refuses
    for a while: no leader, the stream offline)."""
    try:
        return await ensure_events_stream(js, replicas)
    except Exception as exc:
        if fatal and refused_for_good(exc):
            raise stream_refused(replicas, exc) from None
        raise


#: JetStream's codes of refusals of what a stream's configuration asks: an invalid
#: configuration, replicas on a server that is not clustered (both sent as 500s).
CONFIG_REFUSAL_CODES: Final = frozenset({10052, 10074})


def refused_for_good(exc: BaseException) -> bool:
    """Whether JetStream refused to make or update a stream for what the configuration asks
    (a 400, or one of :data:`CONFIG_REFUSAL_CODES`; a stream of another storage), not for
    its state (no leader yet, the stream offline: other 5xx)."""
    if isinstance(exc, StreamConfigConflict):
        return True
    if not isinstance(exc, nats.js.errors.APIError) or refusal_passes(exc):
        return False
    return isinstance(exc, BadRequestError) or exc.err_code in CONFIG_REFUSAL_CODES
