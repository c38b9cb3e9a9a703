"""A loopback TCP relay between simulated locks and the real broker that a test can cut and restore.

`cut()` aborts every relayed connection (the broker sees the lock vanish: its will fires) and,
until `restore()`, accepts and at once aborts new ones: the lock's link is down for exactly as
long as the test wants, whatever the lock's reconnect delay. Bounded: one listening socket, two
copy tasks per relayed connection, all ended by `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib


class Relay:
    def __init__(self, broker_host: str, broker_port: int) -> None:
        self.target = (broker_host, broker_port)
        self.up = True
        self.accepted = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if not self.up:
            writer.transport.abort()
            return
        try:
            b_reader, b_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, b_writer)
        self._conns.add(pair)
        for src, dst in ((reader, b_writer), (b_reader, writer)):
            t = asyncio.get_running_loop().create_task(self._copy(src, dst, pair))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _copy(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._abort(pair)

    def _abort(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self._conns.discard(pair)
        for w in pair:
            w.transport.abort()

    def cut(self) -> None:
        """Down: drop every relayed connection now and refuse new ones until restore()."""
        self.up = False
        for pair in list(self._conns):
            self._abort(pair)

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
