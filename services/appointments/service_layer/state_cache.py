"""Recently written appointment states, so a follow-up command can skip reading its stream.

A cached state is only ever a *guess*: a command decided on it appends with the cached
version as its expected version, and the event store refuses the append if the stream
moved on meanwhile (another instance, another process), after which the command is
decided again on what is stored. Answers that write nothing (a no-op, a refusal) are
always decided on fresh state, never on a guess.

Entries are kept encoded (JSON bytes under the stream's integer id): ten thousand live
states as structs, UUIDs and tuples were ~70,000 objects for the garbage collector to
walk on every full collection — pauses of tens of milliseconds under load. Bytes and ints
are not tracked by the collector, and a state decodes in about a microsecond.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, cast
from uuid import UUID

import msgspec

from services.appointments.domain.state import Cancelled, NotScheduled, Scheduled, Started, State

_KINDS: Final = (NotScheduled, Scheduled, Cancelled, Started)
_CODES: Final = {kind: code for code, kind in enumerate(_KINDS)}
_DECODERS: Final = tuple(msgspec.json.Decoder(kind) for kind in _KINDS)
_ENCODE: Final = msgspec.json.Encoder().encode


class StateCache:
    """The last committed (state, version) of up to ``size`` appointments, oldest evicted."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        # stream id (as int) -> (version, kind code, encoded state)
        self._states: OrderedDict[int, tuple[int, int, bytes]] = OrderedDict()

    def get(self, stream_id: UUID) -> tuple[State, int] | None:
        """The cached (state, version), if any."""
        entry = self._states.get(stream_id.int)
        if entry is None:
            return None
        version, code, encoded = entry
        return cast(State, _DECODERS[code].decode(encoded)), version

    def put(self, stream_id: UUID, state: State, version: int) -> None:
        """Remember a state read or written at ``version`` (an older one never wins)."""
        if self._size <= 0:
            return
        key = stream_id.int
        known = self._states.get(key)
        if known is not None and known[0] > version:
            return
        self._states[key] = (version, _CODES[type(state)], _ENCODE(state))
        self._states.move_to_end(key)
        if len(self._states) > self._size:
            self._states.popitem(last=False)

    def forget(self, stream_id: UUID) -> None:
        """Drop a state found stale."""
        self._states.pop(stream_id.int, None)

    def clear(self) -> None:
        """Drop every state: the store failed, and what it holds may have changed under
        the cache (a failover that lost the last commits)."""
        self._states.clear()

    def __len__(self) -> int:
        return len(self._states)
