"""WhisperLiveKit upstream: a pool of ``/asr`` servers behind admission, pacing and resume.

One session, as the pipeline sees it (the lease, from the engine's admission, says which server)::

    Ticket.wait (FIFO queue) ─► open_session(lease) ─► connect ─► config ─► yield
                                  send_audio ─► replay buffer ─► writer ──(paced)──► server
                                  results() ◄── conflated update ◄── reader ◄──────── server
                                                                     heartbeat ─ping─► server

Each connection runs three tasks in one nursery: the *reader* always keeps reading (so
trio-websocket's receive queue never fills and stops our pongs), turns frames into updates and
feeds the pacer; the *writer* sends the replay buffer in frames when the pacer allows; the
*heartbeat* pings with a timeout, as trio-websocket's docs recommend. A session-level driver
runs connections one after another: when one drops abnormally (a transient close code, a missed
pong, a refused handshake) it backs off and reconnects, resuming from the end of the last
committed line (see :class:`~gateway.engines._wlk_protocol.Stitcher`).

How much audio may be in flight is the pacer's to say (:mod:`gateway.engines._wlk_pacer`, with its
essay); backoff, close codes, refusals and the connector seam are the shared upstream kit
(:mod:`gateway.engines._upstream`). This module never imports the pipeline, the fronts or the store.

Errors: trio-websocket and socket errors are mapped in one place, :meth:`_WlkSession._map_error`,
into either a retryable :class:`_Drop` (internal) or the gateway's tree: ``UpstreamUnavailable``
when no connection could be made, ``UpstreamError`` when the server failed or resuming failed,
``Timeout`` when ``ready_to_stop`` never came within ``session_timeout`` (the cap on a whole
session). Failures after the session opened surface from ``results()``; ``send_audio`` then just
discards audio, so that the pipeline sees exactly one error.

Encoded mode (a server without ``--pcm-input``): the upload's bytes are one ffmpeg stream that
cannot be restarted mid-way, so a resume re-sends the whole upload from its first byte on a new
connection and drops the re-transcribed lines that end up before the resume point (their midpoint
decides). That needs the upload kept in memory, up to :data:`ENCODED_REPLAY_MAX_BYTES`; past it
a drop ends the session with ``UPSTREAM_ERROR``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio
from prometheus_client import Counter
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from ..admission import Lease
from ..config import WhisperLiveKitConfig
from ..errors import (
    ConfigError,
    GatewayError,
    InternalError,
    Timeout,
    UpstreamError,
    UpstreamUnavailable,
    collapse_groups,
)
from ..events import EngineUpdate
from ..metrics import REGISTRY
from . import _wlk_protocol as wlk
from ._upstream import (
    Connector,
    Signal,
    UpdateFeed,
    backoff_delay,
    closed_by,
    pool_stats,
    rejected,
    websocket_connector,
)
from ._wlk_pacer import Pacer
from .base import PCM_BYTES_PER_SECOND, AudioFormat, Engine, Session, SessionOptions

__all__ = [
    "CLOSE_TIMEOUT",
    "ENCODED_REPLAY_MAX_BYTES",
    "FRAME_BYTES",
    "REPLAY_MAX_BYTES",
    "WhisperLiveKitEngine",
    "connect_tcp",
]

log = logging.getLogger("gateway.engines.whisperlivekit")

# PCM goes out in 250 ms frames (8,000 bytes), inside WhisperLiveKit's recommended 100-500 ms band.
FRAME_BYTES: Final = PCM_BYTES_PER_SECOND // 4
# Encoded mode forwards the upload's bytes in frames of at most 16 KiB.
ENCODED_FRAME_BYTES: Final = 16 * 1024
# Audio accepted by send_audio but not yet sent: two frames (16 KB PCM, 32 KiB encoded); past this
# send_audio blocks, which is how pacing pushes back on the pipeline's decoder.
PENDING_FRAMES: Final = 2
# PCM replay buffer: audio already sent but not yet covered by a committed line, kept to resume
# after a drop. Capped at 60 s = 1.92 MB per session; in practice it holds about lead_seconds,
# since WhisperLiveKit commits speech well within that. Past the cap the oldest audio goes (it can
# only be a long uncommitted stretch, i.e. silence), and a resume starts at the oldest audio kept.
REPLAY_MAX_BYTES: Final = 60 * PCM_BYTES_PER_SECOND
# The replay buffer is trimmed in steps of at least 64 KiB (2 s), not on every update.
TRIM_STEP_BYTES: Final = 64 * 1024
# Encoded mode keeps the whole upload for a resume from the start: at most 32 MiB per session.
ENCODED_REPLAY_MAX_BYTES: Final = 32 * 1024 * 1024
# Pacing in encoded mode converts bytes to seconds at this floor bitrate (16 kbit/s, below any
# usual speech codec setting), so unconfirmed encoded audio is never under-counted.
ENCODED_MIN_BYTES_PER_SECOND: Final = 2_000
# trio-websocket's receive queue: 1 message of at most 4 MiB (full mode resends the whole
# transcript, ~100 KB for an hour), so 4 MiB per session at worst; the reader drains it at once.
MESSAGE_QUEUE_SIZE: Final = 1
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
# Budget for a polite close (our close frame and the server's answer).
CLOSE_TIMEOUT: Final = 0.5
# When the session is cancelled, the connection's reader is cancelled with it, so the server's
# answer to our close frame cannot be read: the frame is still sent, but not waited on for long.
ABORT_CLOSE_TIMEOUT: Final = 0.05
# Silence appended before end of audio in PCM mode (32 KB): WhisperLiveKit 0.2.26 may drop the last
# words when decoding ends during its final send (fixed after 0.2.26 by PR #440); a pause makes
# VAD commit the tail first. It is audio like any other, so it is replayed on resume too.
EOF_PADDING_BYTES: Final = PCM_BYTES_PER_SECOND

RECONNECTS = Counter(
    "gateway_wlk_reconnects",
    "WhisperLiveKit connections lost or refused during a session and retried, by reason.",
    ["engine", "upstream", "reason"],
    registry=REGISTRY,
)
SESSION_FAILURES = Counter(
    "gateway_wlk_session_failures",
    "WhisperLiveKit sessions that ended in an error, by error code.",
    ["engine", "code"],
    registry=REGISTRY,
)


# The production connector: real ``ws://`` or ``wss://`` connections.
connect_tcp: Final = websocket_connector(
    close_timeout=CLOSE_TIMEOUT,
    message_queue_size=MESSAGE_QUEUE_SIZE,
    max_message_size=MAX_MESSAGE_BYTES,
)


class _Drop(Exception):
    """A connection was lost (or never made) in a way that a reconnect may cure."""

    def __init__(self, reason: str, *, label: str, connect_failed: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.label = label
        self.connect_failed = connect_failed


@dataclass(eq=False)
class _Connection:
    url: str
    pacer: Pacer
    #: The config message arrived: the handshake fully succeeded.
    configured: bool = False
    eof_sent: bool = False
    #: ``ready_to_stop`` arrived: the session is complete.
    done: bool = False
    #: The first failure of any of the connection's tasks.
    error: Exception | None = None
    reported: Signal = field(default_factory=Signal)


def _pcm_offset(seconds: float) -> int:
    """Seconds to a byte offset on a sample boundary."""
    return max(0, round(seconds * PCM_BYTES_PER_SECOND / 2)) * 2


class _WlkSession(Session):
    def __init__(self, engine: WhisperLiveKitEngine, lease: Lease, options: SessionOptions) -> None:
        self._engine = engine
        self._cfg = engine.config
        self._lease = lease
        self._options = options
        self.audio_format: AudioFormat = "pcm"
        self._started = False
        self._closed = False
        # The replay buffer: absolute byte offsets [_base, _end) of the session's audio.
        self._audio = bytearray()
        self._base = 0
        self._end = 0
        # Where the current connection's writer is: the next byte to send.
        self._cursor = 0
        self._eof = False
        self._real_end = 0
        self._replayable = True
        self._audio_arrived = Signal()
        self._space_freed = Signal()
        self._stitcher = wlk.Stitcher()
        self._results = UpdateFeed()

    # -- the pipeline's side ----------------------------------------------------------------
    async def send_audio(self, chunk: bytes) -> None:
        if self._eof:
            raise RuntimeError("send_audio after end_audio")
        if self._results.failure is not None or self._closed or not chunk:
            return
        self._audio += chunk
        self._end += len(chunk)
        if self.audio_format == "encoded" and self._end > ENCODED_REPLAY_MAX_BYTES:
            self._replayable = False
        self._audio_arrived.fire()
        frame = FRAME_BYTES if self.audio_format == "pcm" else ENCODED_FRAME_BYTES
        while (
            self._end - self._cursor > PENDING_FRAMES * frame
            and self._results.failure is None
            and not self._closed
        ):
            await self._space_freed.wait()

    async def end_audio(self) -> None:
        if self._eof:
            return
        self._real_end = self._end
        if self.audio_format == "pcm":
            self._audio += bytes(EOF_PADDING_BYTES)
            self._end += EOF_PADDING_BYTES
        self._eof = True
        self._audio_arrived.fire()

    def results(self) -> AsyncIterator[EngineUpdate]:
        return self._results.updates()

    # -- plumbing -------------------------------------------------------------------------------
    def _fail(self, failure: GatewayError) -> None:
        SESSION_FAILURES.labels(self._engine.name, failure.code).inc()
        self._results.fail(failure)
        self._space_freed.fire()

    def _close(self) -> None:
        self._closed = True
        self._space_freed.fire()

    def _audio_limit(self) -> float:
        """Seconds of real audio received (the EOF padding excluded), for ``processed``."""
        if self.audio_format != "pcm":
            return math.inf
        return (self._real_end if self._eof else self._end) / PCM_BYTES_PER_SECOND

    def _snapshot(self, conn: _Connection) -> EngineUpdate:
        if self.audio_format == "pcm":
            progress = conn.pacer.processed(trio.current_time())
        else:
            progress = conn.pacer.committed
        processed = min(self._stitcher.offset + progress, self._audio_limit())
        return self._stitcher.snapshot(max(processed, self._results.latest.processed))

    def _final_processed(self) -> float:
        if self.audio_format == "pcm":
            return self._real_end / PCM_BYTES_PER_SECOND
        return max(self._results.latest.processed, self._options.total_time or 0.0)

    def _trim(self) -> None:
        """Drop PCM that no resume can need: before the resume point, or past the cap."""
        if self.audio_format != "pcm":
            return
        keep = max(_pcm_offset(self._stitcher.resume_point), self._cursor - REPLAY_MAX_BYTES)
        keep = min(keep, self._cursor)
        if keep - self._base >= TRIM_STEP_BYTES:
            del self._audio[: keep - self._base]
            self._base = keep

    # -- the session driver ---------------------------------------------------------------------
    async def drive(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the session's connections; reports started once the first one is configured.

        Before that, a failure is raised (so ``open_session`` raises it); after, it is handed to
        ``results()``.
        """
        failure: GatewayError
        try:
            with trio.fail_after(self._cfg.session_timeout):
                await self._connect_loop(task_status)
            return
        except trio.TooSlowError as exc:
            failure = Timeout(
                f"{self._lease.key}: no ready_to_stop within session_timeout "
                f"({self._cfg.session_timeout:g} s)"
            )
            failure.__cause__ = exc
        except GatewayError as exc:
            failure = exc
        except Exception as exc:
            log.exception("WhisperLiveKit session on %s failed", self._lease.key)
            failure = InternalError(f"WhisperLiveKit session failed: {exc!r}")
            failure.__cause__ = exc
        if not self._started:
            SESSION_FAILURES.labels(self._engine.name, failure.code).inc()
            raise failure
        self._fail(failure)

    async def _connect_loop(self, task_status: trio.TaskStatus[None]) -> None:
        # Reconnect policy: consecutive failed attempts (a refused or timed-out connect, or a
        # connection lost before it committed anything new) are counted; a connection that moved
        # the resume point forward resets the count, so a long session survives many unrelated
        # drops but a server that fails every time is given up after max_attempts. Delays grow
        # exponentially from backoff_initial to backoff_max with jitter, so that sessions dropped
        # together by one server restart do not reconnect in lockstep.
        failures = 0
        while True:
            url = self._lease.key
            try:
                await self._connection(url, task_status)
                return
            except _Drop as drop:
                progressed = self._stitcher.end_connection()
                failures = 0 if progressed else failures + 1
                if drop.connect_failed:
                    self._lease.failed(self._engine.url_backoff(url))
                if failures >= self._cfg.max_attempts:
                    error = UpstreamError if self._started else UpstreamUnavailable
                    raise error(
                        f"{url}: {drop.reason}; gave up after {failures} failed attempts"
                    ) from drop
                RECONNECTS.labels(self._engine.name, url, drop.label).inc()
                delay = self._engine.backoff(failures)
                log.info(
                    "WhisperLiveKit %s: %s; reconnecting in %.2f s from %.2f s",
                    url,
                    drop.reason,
                    delay,
                    self._stitcher.resume_point,
                )
                self._rewind(drop)
                await trio.sleep(delay)
                self._lease.reroute()

    def _rewind(self, drop: _Drop) -> None:
        """Point the writer at the audio the next connection must start with."""
        if not self._started:
            return
        if self.audio_format == "encoded":
            if not self._replayable:
                raise UpstreamError(
                    f"cannot resume after '{drop.reason}': the encoded upload is larger than the "
                    f"replay buffer ({ENCODED_REPLAY_MAX_BYTES} bytes)"
                ) from drop
            self._cursor = 0
            self._stitcher.begin_connection(0.0, skip_before=self._stitcher.resume_point)
        else:
            point = min(max(_pcm_offset(self._stitcher.resume_point), self._base), self._cursor)
            self._cursor = point
            self._stitcher.begin_connection(point / PCM_BYTES_PER_SECOND)
        self._space_freed.fire()

    async def _connection(self, url: str, task_status: trio.TaskStatus[None]) -> None:
        conn = _Connection(url, Pacer(self._cfg.lead_seconds))
        target = self._engine.session_url(url, self._options)
        try:
            async with self._engine.connector(
                target,
                extra_headers=self._engine.headers,
                connect_timeout=self._cfg.connect_timeout,
            ) as ws:
                try:
                    await self._converse(ws, conn, task_status)
                finally:
                    cancelled = trio.current_effective_deadline() == -math.inf
                    budget = ABORT_CLOSE_TIMEOUT if cancelled else CLOSE_TIMEOUT
                    with trio.CancelScope(shield=True), trio.move_on_after(budget):
                        await ws.aclose(1000 if conn.done else 1001)
                    # trio-websocket 0.12 leaves the transport open when the peer vanished
                    # without a close frame (1006): aclose() returns early once a close reason
                    # is set, and so does open_websocket's exit. Close it here, whatever state.
                    transport = getattr(ws, "_stream", None)
                    if isinstance(transport, trio.abc.AsyncResource):
                        await trio.aclose_forcefully(transport)
        except (HandshakeError, ConnectionClosed, OSError) as exc:
            if conn.done:
                return
            raise self._map_error(exc, conn) from exc

    def _map_error(self, exc: Exception, conn: _Connection) -> Exception:
        """The one boundary where trio-websocket and socket errors enter the gateway's tree."""
        if isinstance(exc, ConnectionRejected):
            # Any refusal but the token's may be this server's alone: back off, and the
            # lease may move the session to another server of the pool.
            refusal = rejected(exc)
            status = refusal.status
            if refusal.credentials:
                error = UpstreamError if self._started else UpstreamUnavailable
                return error(f"{conn.url} refused the session with HTTP {status}: check the token")
            return _Drop(
                f"handshake refused with HTTP {status}", label=f"http_{status}", connect_failed=True
            )
        if isinstance(exc, HandshakeError | OSError):
            cause = exc.__cause__ or exc
            return _Drop(f"cannot connect: {cause!r}", label="connect", connect_failed=True)
        assert isinstance(exc, ConnectionClosed)
        closed = closed_by(exc)
        if closed.transient:
            return _Drop(
                f"closed with {closed}", label=str(closed.code), connect_failed=not conn.configured
            )
        return UpstreamError(f"{conn.url} closed the session with {closed} before ready_to_stop")

    async def _converse(
        self, ws: WebSocketConnection, conn: _Connection, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            with trio.fail_after(self._cfg.connect_timeout):
                first = wlk.decode_message(await ws.get_message())
        except trio.TooSlowError as exc:
            raise _Drop(
                f"no config message within {self._cfg.connect_timeout:g} s",
                label="no_config",
                connect_failed=True,
            ) from exc
        if not isinstance(first, wlk.ServerConfig):
            raise UpstreamError(f"{conn.url} did not open with a config message")
        audio_format: AudioFormat = "pcm" if first.pcm else "encoded"
        if self._started and audio_format != self.audio_format:
            raise UpstreamError(
                f"{conn.url} expects {audio_format} audio but this session sends "
                f"{self.audio_format}"
            )
        conn.configured = True
        self._lease.succeeded()
        if not self._started:
            self.audio_format = audio_format
            self._started = True
            task_status.started()
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(self._guard, conn, scope, self._heartbeat, ws)
            nursery.start_soon(self._guard, conn, scope, self._write, ws)
            await self._guard(conn, scope, self._read, ws)
            scope.cancel()
        if conn.error is not None:
            raise conn.error

    async def _guard(
        self,
        conn: _Connection,
        scope: trio.CancelScope,
        task: Callable[[WebSocketConnection, _Connection], Awaitable[None]],
        ws: WebSocketConnection,
    ) -> None:
        # The connection's tasks record their first failure instead of raising, so that one
        # failure (not an exception group) reaches the reconnect logic.
        try:
            await task(ws, conn)
        except Exception as exc:
            if conn.error is None:
                conn.error = exc
            scope.cancel()

    async def _read(self, ws: WebSocketConnection, conn: _Connection) -> None:
        while True:
            message = await ws.get_message()
            if isinstance(message, bytes):
                continue
            event = wlk.decode_message(message)
            if isinstance(event, wlk.Transcription):
                self._stitcher.update(event)
                conn.pacer.report(event.backlog, self._stitcher.connection_end)
                conn.reported.fire()
                self._trim()
                self._results.publish(self._snapshot(conn))
            elif isinstance(event, wlk.ReadyToStop):
                if not conn.eof_sent:
                    raise UpstreamError(f"{conn.url} sent ready_to_stop before the end of audio")
                conn.done = True
                self._results.publish(self._stitcher.finalize(self._final_processed()), final=True)
                return
            elif isinstance(event, wlk.ServerError):
                raise UpstreamError(f"{conn.url}: {event.detail}")
            # A repeated config or an unknown message type changes nothing.

    async def _write(self, ws: WebSocketConnection, conn: _Connection) -> None:
        pcm = self.audio_format == "pcm"
        frame_bytes = FRAME_BYTES if pcm else ENCODED_FRAME_BYTES
        bytes_per_second = PCM_BYTES_PER_SECOND if pcm else ENCODED_MIN_BYTES_PER_SECOND
        while True:
            available = self._end - self._cursor
            if available == 0 and self._eof:
                # End of audio is an empty binary frame; a text frame would kill the session.
                await ws.send_message(b"")
                conn.eof_sent = True
                return
            if available == 0 or (pcm and available < frame_bytes and not self._eof):
                await self._audio_arrived.wait()
                continue
            size = min(available, frame_bytes)
            seconds = size / bytes_per_second
            await self._wait_for_room(ws, conn, seconds)
            start = self._cursor - self._base
            await ws.send_message(bytes(self._audio[start : start + size]))
            self._cursor += size
            conn.pacer.sent += seconds
            if not self._replayable:
                del self._audio[: self._cursor - self._base]
                self._base = self._cursor
            self._space_freed.fire()

    async def _wait_for_room(
        self, ws: WebSocketConnection, conn: _Connection, seconds: float
    ) -> None:
        pacer = conn.pacer
        while not pacer.may_send(seconds, trio.current_time()):
            if pacer.unconfirmed():
                await self._ping(ws, conn)
                continue
            with trio.move_on_at(pacer.next_settle()):
                await conn.reported.wait()

    async def _heartbeat(self, ws: WebSocketConnection, conn: _Connection) -> None:
        while True:
            await trio.sleep(self._cfg.ping_interval)
            await self._ping(ws, conn)

    async def _ping(self, ws: WebSocketConnection, conn: _Connection) -> None:
        """Ping and wait for the pong (trio-websocket's heartbeat recipe); it also confirms audio."""
        sent = conn.pacer.sent
        conn.pacer.asked(sent)
        try:
            with trio.fail_after(self._cfg.ping_timeout):
                await ws.ping()
        except trio.TooSlowError as exc:
            raise _Drop(
                f"no pong within {self._cfg.ping_timeout:g} s", label="ping_timeout"
            ) from exc
        conn.pacer.acked(sent, trio.current_time())


class WhisperLiveKitEngine(Engine):
    """Sessions on a pool of WhisperLiveKit servers (``urls``), ``max_sessions`` per server."""

    kind = "whisperlivekit"
    shares_upstream = True

    def __init__(
        self,
        name: str,
        config: WhisperLiveKitConfig,
        *,
        connector: Connector | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not config.urls:
            raise ConfigError(
                f"engines.{name}.urls: a whisperlivekit engine needs at least one url"
            )
        for url in config.urls:
            if urlsplit(url).scheme not in ("ws", "wss"):
                raise ConfigError(f"engines.{name}.urls: {url!r} is not a ws:// or wss:// url")
        super().__init__(name, config, sessions=dict.fromkeys(config.urls, config.max_sessions))
        self.config = config
        self.connector: Connector = connector or connect_tcp
        self.headers: list[tuple[bytes, bytes]] = (
            [(b"authorization", f"Bearer {config.token}".encode())] if config.token else []
        )
        self._random = rng or random.Random()

    def session_url(self, url: str, options: SessionOptions) -> str:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        query.setdefault("mode", "full")
        if options.language:
            query["language"] = options.language
        return urlunsplit(parts._replace(query=urlencode(query)))

    def backoff(self, failures: int) -> float:
        """Delay before the next attempt after ``failures`` failed attempts in a row: it is
        retry number ``failures + 1`` (the first follows a drop after progress)."""
        cfg = self.config
        return backoff_delay(failures + 1, cfg.backoff_initial, cfg.backoff_max, self._random)

    def url_backoff(self, url: str) -> float:
        """How long a server that failed to connect is avoided by new sessions."""
        return self.backoff(self.admission.failures(url))

    @asynccontextmanager
    async def open_session(self, options: SessionOptions, lease: Lease) -> AsyncIterator[Session]:
        session = _WlkSession(self, lease, options)
        # Only the body's (or the failed start's) exception is in a group here, plus Cancelled:
        # it is re-raised as itself, as open_websocket does, so callers see gateway errors.
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                await nursery.start(session.drive)
                try:
                    yield session
                finally:
                    session._close()
                    nursery.cancel_scope.cancel()

    async def readiness(self) -> str | None:
        if self.admission.any_healthy():
            return None
        return "no healthy WhisperLiveKit upstream among " + ", ".join(self.config.urls)

    def stats(self) -> dict[str, Any]:
        return pool_stats(self.admission)

    async def aclose(self) -> None:
        """Nothing engine-wide to release: every connection belongs to a session."""
