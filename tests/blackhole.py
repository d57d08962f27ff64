"""A TCP proxy that can go silent, for tests of a network path lost without a word."""

from __future__ import annotations

import trio

__all__ = ["Blackhole"]


class Blackhole:
    """A TCP proxy to PostgreSQL that can go silent: after :meth:`cut` it forwards nothing and
    closes nothing, as a lost network path does (neither end learns of it)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._cut = trio.Event()

    def cut(self) -> None:
        self._cut.set()

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        async for data in source:
            if self._cut.is_set():
                await trio.sleep_forever()
            await sink.send_all(data)
        done.cancel()  # closed before the cut: close the other side too

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, nursery.cancel_scope)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)
