"""Recently written appointment states, so a follow-up command can skip reading its stream.

A cached state is only ever a *guess*: a command decided on it appends with the cached
version as its expected version, and the event store refuses the append if the stream
moved on meanwhile (another instance, another process), after which the command is
decided again on what is stored. Answers that write nothing (a no-op, a refusal) are
always decided on fresh state, never on a guess.
"""

from __future__ import annotations

from collections import OrderedDict
from uuid import UUID

from services.appointments.domain.state import State


class StateCache:
    """The last committed (state, version) of up to ``size`` appointments, oldest evicted."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._states: OrderedDict[UUID, tuple[State, int]] = OrderedDict()

    def get(self, stream_id: UUID) -> tuple[State, int] | None:
        """The cached (state, version), if any."""
        return self._states.get(stream_id)

    def put(self, stream_id: UUID, state: State, version: int) -> None:
        """Remember a state read or written at ``version`` (an older one never wins)."""
        if self._size <= 0:
            return
        known = self._states.get(stream_id)
        if known is not None and known[1] > version:
            return
        self._states[stream_id] = (state, version)
        self._states.move_to_end(stream_id)
        if len(self._states) > self._size:
            self._states.popitem(last=False)

    def forget(self, stream_id: UUID) -> None:
        """Drop a state found stale."""
        self._states.pop(stream_id, None)

    def __len__(self) -> int:
        return len(self._states)
