"""A NATS cluster of embedded servers on loopback, for the tests that need one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from services.embedded import EmbeddedNats, free_port


@contextlib.contextmanager
def nats_cluster(
    name: str, *, size: int = 3, monitored: bool = False
) -> Iterator[list[EmbeddedNats]]:
    """``size`` clustered ``nats-server``s with JetStream, each storing in a folder of its
    own, not started; stopped (resumed first, if a test paused one) and removed after.
    ``monitored``: each also serves its monitoring endpoint (``-m``, on a port of its own),
    to see which node a client is connected to."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shm))
    routes = [f"nats://127.0.0.1:{free_port()}" for _ in range(size)]
    nodes = [
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
    try:
        yield nodes
    finally:
        for node in nodes:
            node.resume()
            node.stop()
        shutil.rmtree(root, ignore_errors=True)
