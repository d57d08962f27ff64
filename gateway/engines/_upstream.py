"""The upstream kit: what the engines that stream to a WebSocket server share.

The WhisperLiveKit and OpenAI Realtime engines each keep their own session logic, but they
reconnect, read a close or a refused handshake, open a socket and report their pool the same
way, so those live here once:

- :func:`backoff_delay`: the delay before a retry (exponential, capped, jittered);
- :func:`closed_by` and :func:`rejected`: what a close code or an HTTP rejection of the
  handshake means (transient, credentials, refused);
- :class:`Connector`: the seam that opens a socket (tests put in-memory servers behind it), and
  :func:`websocket_connector`, the production one;
- :class:`Signal`: a broadcast wake-up for the tasks of one session;
- :class:`UpdateFeed`: a session's results for the pipeline, conflated;
- :func:`pool_stats`: the figures an upstream pool reports, in the engines' one vocabulary.

Unwrapping a task group's exception group is :func:`gateway.errors.collapse_groups`, shared with
the pipeline and the store.

This module never imports an engine (they import it), nor the pipeline, the fronts or the store.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Final, Protocol

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from ..admission import Admission
from ..errors import GatewayError
from ..events import EngineUpdate
from ..metrics import HEALTHY, QUEUE_LENGTH, SESSIONS
from ._websocket import connect_websocket

__all__ = [
    "JITTER",
    "NORMAL_CLOSURE",
    "TRANSIENT_CLOSE_CODES",
    "Closed",
    "Connector",
    "Rejected",
    "Signal",
    "UpdateFeed",
    "backoff_delay",
    "closed_by",
    "pool_stats",
    "rejected",
    "websocket_connector",
]

# Backoff jitter: each delay is the exponential base times a factor drawn from this range.
JITTER: Final = (0.5, 1.0)
# Beyond this many doublings every delay is the maximum anyway (and 2.0**n would overflow).
_MAX_DOUBLINGS: Final = 30

NORMAL_CLOSURE: Final = 1000
# Close codes after which a new connection may well succeed: going away (1001), no status (1005),
# abnormal closure, no close frame (1006), internal error (1011, also uvicorn's "keepalive ping
# timeout"), service restart (1012), try again later (1013), TLS failure (1015). The openai SDK
# retries the same list. A normal closure (1000) is the engine's to judge: it is how an OpenAI
# server drains a session, but a WhisperLiveKit server that closes before ready_to_stop failed.
TRANSIENT_CLOSE_CODES: Final = frozenset({1001, 1005, 1006, 1011, 1012, 1013, 1015})
# How much of a refusal's body goes into the error detail.
_BODY_CHARS: Final = 200


def backoff_delay(retry: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Delay before retry number ``retry`` (1-based): ``min(initial·2^(retry-1), maximum)·jitter``.

    The jitter spreads the reconnects of many sessions that lost the same upstream at once, so
    that they do not come back in lockstep.
    """
    doublings = min(max(retry, 1) - 1, _MAX_DOUBLINGS)
    return min(initial * 2.0**doublings, maximum) * rng.uniform(*JITTER)


@dataclass(frozen=True, slots=True)
class Closed:
    """How an upstream closed the connection (1006 when no close frame came)."""

    code: int
    reason: str = ""

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_CLOSE_CODES

    def __str__(self) -> str:
        return f"{self.code} ({self.reason})" if self.reason else str(self.code)


def closed_by(exc: ConnectionClosed) -> Closed:
    reason = exc.reason
    if reason is None:
        return Closed(1006)
    return Closed(reason.code, reason.reason or "")


@dataclass(frozen=True, slots=True)
class Rejected:
    """An HTTP answer that refused the WebSocket handshake."""

    status: int
    #: The start of the response body, for the error detail.
    body: str = ""

    @property
    def credentials(self) -> bool:
        """The key or token was refused: retrying with the same one cannot help."""
        return self.status in (401, 403)

    @property
    def transient(self) -> bool:
        """Timeout, rate limit or server error: the same request may succeed later."""
        return self.status in (408, 429) or self.status >= 500


def rejected(exc: ConnectionRejected) -> Rejected:
    body = (exc.body or b"")[:_BODY_CHARS].decode("utf-8", "replace")
    return Rejected(exc.status_code, body)


class Connector(Protocol):
    """Opens one client WebSocket, with :func:`trio_websocket.open_websocket_url`'s contract."""

    def __call__(
        self, url: str, *, extra_headers: list[tuple[bytes, bytes]], connect_timeout: float
    ) -> AbstractAsyncContextManager[WebSocketConnection]: ...


def websocket_connector(
    *, close_timeout: float, message_queue_size: int = 1, max_message_size: int = 1024 * 1024
) -> Connector:
    """The production connector: real ``ws://`` or ``wss://`` connections with these limits."""

    def connect(
        url: str, *, extra_headers: list[tuple[bytes, bytes]], connect_timeout: float
    ) -> AbstractAsyncContextManager[WebSocketConnection]:
        return connect_websocket(
            url,
            extra_headers,
            connect_timeout,
            close_timeout=close_timeout,
            message_queue_size=message_queue_size,
            max_message_size=max_message_size,
        )

    return connect


class Signal:
    """A broadcast wake-up: ``fire`` wakes every current waiter; later ones wait for the next.

    Callers check their condition and then ``wait`` without a checkpoint in between, so in trio
    no wake-up can be lost.
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class UpdateFeed:
    """A session's cumulative updates for its one reader, conflated: a slow reader gets the
    newest update, never a backlog (each update holds everything before it).

    The final update ends the iteration. A failure is raised to the reader once it has every
    update published before it; after the final one a failure is no longer news and is ignored.
    ``stop`` ends the iteration without a final (the session was closed).
    """

    def __init__(self) -> None:
        self.latest = EngineUpdate()
        self.final = False
        self.failure: GatewayError | None = None
        self._stopped = False
        self._version = 0
        self._changed = Signal()

    def publish(self, update: EngineUpdate, *, final: bool = False) -> None:
        """Publish ``update``; the same update again is no news, except as the final one."""
        if not final and update == self.latest:
            return
        self.latest = update
        self.final = self.final or final
        self._version += 1
        self._changed.fire()

    def fail(self, failure: GatewayError) -> None:
        if not self.final:
            self.failure = failure
            self._changed.fire()

    def stop(self) -> None:
        self._stopped = True
        self._changed.fire()

    async def updates(self) -> AsyncIterator[EngineUpdate]:
        seen = 0
        while True:
            if self._version != seen:
                seen = self._version
                yield self.latest
                continue
            if self.failure is not None:
                raise self.failure
            if self.final or self._stopped:
                return
            await self._changed.wait()


def pool_stats(admission: Admission) -> dict[str, Mapping[str, int] | int]:
    """Sessions and health per upstream, and the queue, as an upstream pool reports them."""
    return {
        SESSIONS: admission.sessions(),
        QUEUE_LENGTH: admission.queue_length,
        HEALTHY: {upstream: int(ok) for upstream, ok in admission.health().items()},
        **admission.shared_figures(),
    }
