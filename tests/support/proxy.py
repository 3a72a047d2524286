"""A TCP proxy in front of a server that can freeze: for the tests of a database or a
network that hangs (accepts, keeps every connection open, never answers) rather than
refuses."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from services.embedded import free_port


class FreezingProxy:
    """A TCP proxy to a server (PostgreSQL) that can freeze: it keeps every connection
    open and forwards nothing more until it thaws, when what it held goes on."""

    def __init__(self, url: str) -> None:
        """A proxy to the server of ``url`` (``postgresql://…``); ``self.url`` is ``url``
        with the proxy's address in its place."""
        target = urlsplit(url)
        self._target = (target.hostname or "127.0.0.1", target.port or 5432)
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._server: asyncio.Server | None = None
        self.port = free_port()
        userinfo = target.netloc.rpartition("@")[0]
        at = f"{userinfo}@" if userinfo else ""
        self.url = target._replace(netloc=f"{at}127.0.0.1:{self.port}").geturl()

    async def __aenter__(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        self._thawed.set()

    def freeze(self) -> None:
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        await asyncio.gather(
            self._pump(reader, upstream_writer),
            self._pump(upstream_reader, writer),
            return_exceptions=True,
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction, until its end; then the other side is closed too (a client that
        waits for the server to close after its goodbye, as asyncpg does, is not left
        waiting for ever)."""
        try:
            while data := await reader.read(65536):
                await self._thawed.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
