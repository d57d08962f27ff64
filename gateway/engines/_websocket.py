"""Opening a client WebSocket over a TCP (or TLS) stream that we own, for the upstream engines.

The transport under :mod:`gateway.engines._upstream`'s connector; it never imports an engine.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from ..errors import collapse_groups

__all__ = ["connect_websocket"]


@asynccontextmanager
async def connect_websocket(
    url: str,
    headers: list[tuple[bytes, bytes]],
    connect_timeout: float,
    *,
    close_timeout: float,
    message_queue_size: int = 1,
    max_message_size: int = 1024 * 1024,
) -> AsyncIterator[WebSocketConnection]:
    """``trio_websocket.open_websocket_url``'s contract, except that we own the TCP stream and
    always close it.

    trio-websocket 0.12's own connect leaves the socket open when the server rejects the
    handshake with an HTTP status (401, 503...), which leaks a file descriptor per attempt. A
    refused TCP connect raises :class:`HandshakeError`; a slow one :class:`ConnectionTimeout`.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a WebSocket URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname if port in (80, 443) else f"{parts.hostname}:{port}"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stream: trio.abc.Stream | None = None
    try:
        # The handshake's failure arrives from trio-websocket's reader task, in a group.
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(connect_timeout):
                        tcp = await trio.open_tcp_stream(parts.hostname, port)
                        stream = tcp
                        if secure:
                            stream = trio.SSLStream(
                                tcp, ssl.create_default_context(), server_hostname=parts.hostname
                            )
                        ws = await wrap_client_stream(
                            nursery,
                            stream,
                            host,
                            resource,
                            extra_headers=headers,
                            message_queue_size=message_queue_size,
                            max_message_size=max_message_size,
                        )
                except trio.TooSlowError:
                    raise ConnectionTimeout from None
                except OSError as exc:
                    raise HandshakeError(f"{url}: {exc}") from exc
                try:
                    yield ws
                finally:
                    with trio.move_on_after(close_timeout):
                        await ws.aclose()
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)
