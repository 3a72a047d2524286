"""Which refusals of JetStream stop ``clinic appointments`` (exit 2), and when; which fail a
push for good."""

from __future__ import annotations

from typing import Any, cast

import nats.errors
import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError, BadRequestError, ServerError, ServiceUnavailableError

from services.appointments.adapters.nats.streams import (
    EventsStream,
    StreamConfigConflict,
    ensure_events_stream_or_fail,
    events_stream_config,
    refused_for_good,
)
from services.config import ConfigError
from services.notifications.channels import DeliveryFailed, PushChannel
from tests.support.builders import notification

NOT_CLUSTERED = ServerError(
    code=500, err_code=10074, description="replicas > 1 not supported in non-clustered mode"
)
NO_LEADER = ServerError(code=500, err_code=10009, description="JetStream cluster not leader")
OFFLINE = ServerError(code=500, err_code=10118, description="stream is offline")


class Refusing:
    """A JetStream context whose stream lookups and publishes fail with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def stream_info(self, *_: Any, **__: Any) -> Any:
        raise self.error

    async def publish(self, *_: Any, **__: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "for_good"),
    [
        (NOT_CLUSTERED, True),
        (BadRequestError(code=400, err_code=10052, description="invalid config"), True),
        (StreamConfigConflict("storage cannot change"), True),
        (NO_LEADER, False),
        (OFFLINE, False),
        (ServiceUnavailableError(code=503), False),
        (ServerError(code=503, err_code=10023, description="insufficient resources"), False),
        (TimeoutError(), False),
    ],
)
def test_only_what_the_configuration_asks_is_refused_for_good(
    error: BaseException, for_good: bool
) -> None:
    assert refused_for_good(error) is for_good


async def test_at_start_a_refusal_for_good_is_a_configuration_error() -> None:
    js = cast(JetStreamContext, Refusing(NOT_CLUSTERED))
    with pytest.raises(ConfigError, match="CLINIC_NATS_STREAM_REPLICAS=3"):
        await ensure_events_stream_or_fail(js, 3)


@pytest.mark.parametrize("error", [NO_LEADER, OFFLINE])
async def test_a_cluster_in_a_rolling_restart_is_waited_out(error: APIError) -> None:
    with pytest.raises(APIError) as raised:
        await ensure_events_stream_or_fail(cast(JetStreamContext, Refusing(error)), 3)
    assert raised.value is error  # retried by the relay and the projector, not fatal


async def test_once_the_stream_was_made_every_refusal_is_waited_out() -> None:
    js = cast(JetStreamContext, Refusing(NOT_CLUSTERED))
    with pytest.raises(APIError):
        await ensure_events_stream_or_fail(js, 3, fatal=False)


class Flaky:
    """A JetStream context whose stream exists as the code wants it, until ``error``."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    async def stream_info(self, *_: Any, **__: Any) -> Any:
        if self.error is not None:
            raise self.error

        class Info:
            config = events_stream_config(3)

        return Info()


async def test_a_role_stops_on_a_refusal_for_good_only_before_it_made_the_stream() -> None:
    """The relay and the projector: at start, exit 2; once running, wait it out (a node of
    a cluster restarted without its clustering, say, is an outage to ride out)."""
    with pytest.raises(ConfigError):
        await EventsStream(3).ensure(cast(JetStreamContext, Refusing(NOT_CLUSTERED)))
    js = Flaky()
    running = EventsStream(3)
    await running.ensure(cast(JetStreamContext, js))
    js.error = NOT_CLUSTERED
    with pytest.raises(APIError) as raised:
        await running.ensure(cast(JetStreamContext, js))
    assert raised.value is NOT_CLUSTERED


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (
            BadRequestError(code=400, err_code=10054, description="maximum message size exceeded"),
            True,
        ),
        (OFFLINE, False),  # a cluster incident: the push is tried again
        (NO_LEADER, False),
        (ServerError(code=500, err_code=10049, description="stream store failed"), False),
        (ServiceUnavailableError(code=503), False),
        (APIError(code=429, description="too many requests"), False),
        (APIError(code=408, description="request timeout"), False),
    ],
)
async def test_a_push_refused_by_jetstream_fails_for_good_only_for_a_request_error(
    error: APIError, permanent: bool
) -> None:
    channel = PushChannel(cast(JetStreamContext, Refusing(error)))
    with pytest.raises(DeliveryFailed) as failed:
        await channel.send(notification())
    assert failed.value.permanent is permanent
    assert not failed.value.in_doubt  # JetStream answered: it did not store the message


@pytest.mark.parametrize(
    ("error", "in_doubt"),
    [
        (nats.errors.TimeoutError(), True),  # no answer: it may be stored all the same
        (TimeoutError(), True),
        (nats.errors.ConnectionClosedError(), True),
        (ConnectionResetError(), True),
        (nats.errors.NoRespondersError(), False),  # nobody took it
        (nats.errors.OutboundBufferLimitError(), False),  # it never left the client
    ],
)
async def test_a_push_that_got_no_answer_is_in_doubt(error: Exception, in_doubt: bool) -> None:
    channel = PushChannel(cast(JetStreamContext, Refusing(error)))
    with pytest.raises(DeliveryFailed) as failed:
        await channel.send(notification())
    assert not failed.value.permanent
    assert failed.value.in_doubt is in_doubt
