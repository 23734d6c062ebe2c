"""Helpers for the real-time tests: a recording Socket.IO client and a TCP proxy that can be cut.

Both use real sockets on loopback. Waiting is always "until a condition holds, or fail after a
generous timeout" — never sleep-and-assert.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import socketio

WAIT = 30.0  # generous upper bound for anything a test waits for


class LiveClient:
    """A ``socketio.AsyncClient`` on one namespace that records every event it receives, in order."""

    def __init__(self, url: str, token: str | None, namespace: str = "/budgets") -> None:
        self.url = url
        self.token = token
        self.namespace = namespace
        self.sio = socketio.AsyncClient(reconnection=False)
        self.received: list[dict[str, Any]] = []  # envelopes, in arrival order, duplicates kept
        self.names: list[str] = []  # the Socket.IO event names, parallel to ``received``
        self.connect_errors: list[Any] = []
        self._changed = asyncio.Event()
        self.sio.on("*", self._on_event, namespace=namespace)
        self.sio.on("connect_error", self._on_connect_error, namespace=namespace)

    async def _on_event(self, name: str, data: Any = None) -> None:
        self.names.append(name)
        self.received.append(data)
        self._changed.set()

    async def _on_connect_error(self, data: Any = None) -> None:
        self.connect_errors.append(data)

    async def connect(self) -> LiveClient:
        auth = {"token": self.token} if self.token is not None else None
        await self.sio.connect(self.url, auth=auth, namespaces=[self.namespace], transports=["websocket"],
                               wait_timeout=WAIT)
        return self

    async def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self.sio.disconnect()

    async def call(self, event: str, data: Any) -> Any:
        return await self.sio.call(event, data, namespace=self.namespace, timeout=WAIT)

    async def subscribe(self, project_id: str, since: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"project_id": project_id}
        if since is not None:
            body["since"] = since
        return await self.call("subscribe", body)

    async def unsubscribe(self, project_id: str) -> dict[str, Any]:
        return await self.call("unsubscribe", {"project_id": project_id})

    def seqs(self, project_id: str | None = None) -> list[int]:
        return [e["seq"] for e in self.received if project_id is None or e["project_id"] == project_id]

    @property
    def last_seq(self) -> int:
        return self.received[-1]["seq"] if self.received else 0

    async def until(self, predicate: Callable[[], bool], within: float = WAIT, what: str = "") -> None:
        """Wait until ``predicate()`` holds; fail with what was received if it does not in time."""
        try:
            async with asyncio.timeout(within):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what or predicate}; received "
                                 f"{[(e['type'], e['seq']) for e in self.received]}") from None

    async def until_seq(self, seq: int, project_id: str | None = None, within: float = WAIT) -> None:
        await self.until(lambda: seq in self.seqs(project_id), within, f"seq {seq}")

    async def until_type(self, type_: str, count: int = 1, within: float = WAIT) -> None:
        await self.until(lambda: sum(e["type"] == type_ for e in self.received) >= count, within,
                         f"{count} × {type_}")


class TcpProxy:
    """Forwards loopback connections to ``target``. ``cut()`` closes every connection and refuses new ones
    (the port is unbound); ``freeze()`` keeps connections open but forwards nothing (a deaf peer)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.connections = 0  # accepted so far

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        self._writers.clear()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await server.wait_closed()

    async def restore(self) -> None:
        await self.start()  # same port again

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self.thaw()
        await self.cut()
