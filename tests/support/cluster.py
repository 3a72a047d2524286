"""Embedded NATS servers on loopback for the tests that need more than one: a cluster, or
independent servers."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from services.embedded import EmbeddedNats, free_port


@contextlib.contextmanager
def _scratch_servers(
    name: str, make: Callable[[Path], list[EmbeddedNats]]
) -> Iterator[list[EmbeddedNats]]:
    """The servers ``make`` builds in a scratch folder of their own (in memory where it
    can be), not started; stopped (resumed first, if a test paused one) and removed after."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shm))
    nodes = make(root)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.resume()
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def nats_cluster(
    name: str, *, size: int = 3, monitored: bool = False
) -> Iterator[list[EmbeddedNats]]:
    """``size`` clustered ``nats-server``s with JetStream, each storing in a folder of its
    own, not started. ``monitored``: each also serves its monitoring endpoint (``-m``, on a
    port of its own), to see which node a client is connected to. The cluster's name is
    ``name`` and a suffix of its own: a route port handed to another test's cluster too
    (chosen here, bound only when its node starts) cannot join the two."""
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    routes = [f"nats://127.0.0.1:{free_port()}" for _ in range(size)]

    def make(root: Path) -> list[EmbeddedNats]:
        return [
            EmbeddedNats(
                root / f"n{i}",
                server_name=f"n{i}",
                cluster_name=name,
                cluster_port=int(route.rsplit(":", 1)[1]),
                routes=[other for other in routes if other != route],
                extra_args=["-m", str(free_port())] if monitored else [],
                die_with_parent=True,
            )
            for i, route in enumerate(routes)
        ]

    with _scratch_servers(name, make) as nodes:
        yield nodes


@contextlib.contextmanager
def nats_servers(name: str, *, size: int = 2) -> Iterator[list[EmbeddedNats]]:
    """``size`` independent (unclustered) ``nats-server``s with JetStream, not started."""

    def make(root: Path) -> list[EmbeddedNats]:
        return [EmbeddedNats(root / f"s{i}", die_with_parent=True) for i in range(size)]

    with _scratch_servers(name, make) as servers:
        yield servers
