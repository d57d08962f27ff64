"""The OpenAI Realtime client: one logical audio stream over reconnecting upstream sessions.

One gateway session is one :class:`RealtimeClient`: a logical audio stream carried over a
sequence of upstream WebSocket connections, each of which is a fresh upstream session. The audio
bookkeeping it drives (the data lane, each connection's replay ledger, the offset map) and the
replay policy are in :mod:`gateway.engines._realtime_replay`; the wire format is
:mod:`gateway.engines._openai_protocol`; backoff, close codes and the connector seam are the
shared upstream kit, :mod:`gateway.engines._upstream`. This module never imports the engine
(:mod:`gateway.engines.openai_realtime` imports it), the pipeline, the fronts or the store.

Two lanes
    A connection has a *control lane* (only ``session.update``) and shares the client's single
    FIFO *data lane* (appends and commits, in the order they were requested). One sender task
    drains them with strict priority: control first, then data, and data only once the
    connection is ready (``session.updated``). A commit is a barrier at its place in the FIFO,
    never a priority: it covers exactly the audio appended before it and none appended after.
    (TEN's client gave commits a lower priority than appends, so a commit slid past audio
    appended later.) Liveness uses WebSocket pings from a separate task, so a heartbeat never
    waits behind queued audio; at most behind the one frame being written.

Before ready
    Nothing is sent before ``session.updated``; appends wait in the data lane, bounded by
    ``buffer_bytes`` of raw PCM (not base64). Past the cap the oldest whole chunks are dropped
    and counted, with one rate-limited warning and a metric. Commits requested while not ready
    coalesce into one, placed at the latest request. A commit with less than 100 ms of audio
    behind it is never sent, and ``input_audio_buffer_commit_empty`` is benign.

Replay
    What a lost connection was sent and had not covered is sent again, in order, to the next
    one once it is ready (the policy is in :mod:`gateway.engines._realtime_replay`). Replayed
    bytes are counted (``gateway_openai_replayed_bytes``).

Reconnect
    Closes 1000 (unexpected), 1001, 1005, 1006, 1011, 1012, 1013 and 1015, handshake failures,
    HTTP 408/429/5xx rejections, a missing pong, no ``session.updated`` within
    ``connect_timeout``, an ``error`` before ready other than ``invalid_request_error``, and
    ``session_expired`` are retried with exponential backoff and jitter. The attempt counter
    resets only on ``session.updated``: a server that accepts the socket and then drops it
    still exhausts ``max_attempts`` (TEN reset on TCP connect and retried forever). HTTP
    401/403, closes 4000 (beta shape) and 1008 (policy) and any other close code are terminal.

Acknowledgements and finishing
    Each commit carries an ``event_id`` and is answered once, in order, by ``committed`` or by
    ``input_audio_buffer_commit_empty`` (which names it). With server VAD the server also
    commits turns by itself, and a commit that closes a speech run still open may come with
    ``speech_stopped`` before or after its ``committed``, or none; answers can be duplicated
    or missing and interleave with transcripts of earlier items. So a ``committed`` answers
    our oldest commit unless its ``speech_stopped`` came before we wrote the commit, or lies
    more than ``silence_duration_ms`` before the commit point (where the VAD could have ended
    the turn by itself); in between it may be either, and it counts as the answer if no other
    comes within ``ACK_GRACE``. Duplicates answer nothing, and a transcript of an item never
    acknowledged implies its ``committed``. After the final commit the session finishes as
    soon as every item is complete and no answer still outstanding could add an item (less
    than 100 ms of audio is in no item). ``FINISH_TIMEOUT`` after the final commit, decided on
    the live connection: with every item complete it finishes with the transcript, whatever
    acknowledgement is missing; otherwise it fails with ``Timeout``.

Errors
    After ready, an ``error`` event (except commit_empty) or a failed item ends the session with
    ``UpstreamError``; the failed item first resolves to an empty final. Unknown event types
    are ignored.

Stop
    ``aclose`` (the end of ``open_session``, including on cancellation) clears the lane,
    ledgers, control lane, pending commits and flags at once, lets the frame in flight finish,
    closes with 1000, and after ``STOP_TIMEOUT`` cancels whatever is left and drops the socket.
    The connection tasks run in a shielded scope that only ``aclose`` cancels, so a cancelled
    caller still gets this orderly stop rather than a frame cut in half.

Memory, per session
    The data lane holds at most ``buffer_bytes`` while not ready and ``SEND_QUEUE_BYTES`` (plus
    one chunk) while ready; the ledger is trimmed to ``buffer_bytes`` (audio trimmed from it can
    no longer be replayed and is counted as ``unreplayable_bytes``). With the 8 MiB default that
    is at most about 16 MiB of PCM, plus trio-websocket's one-message receive queue.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Required, TypedDict, Unpack

import msgspec
import trio
from prometheus_client import Counter
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from ..config import OpenAIRealtimeConfig
from ..errors import GatewayError, Timeout, UpstreamError, UpstreamUnavailable, collapse_groups
from ..events import EngineUpdate
from ..metrics import REGISTRY
from ._openai_protocol import (
    BYTES_PER_MS,
    BYTES_PER_SECOND,
    COMMIT_EMPTY,
    INVALID_REQUEST,
    MIN_COMMIT_BYTES,
    SESSION_EXPIRED,
    Committed,
    ErrorEvent,
    SessionCreated,
    SessionUpdated,
    SpeechStopped,
    TranscriptAssembler,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
    apply_event,
    build_session_update,
    decode_server_event,
    encode_append,
    encode_client_event,
    encode_commit,
)
from ._realtime_replay import AudioChunk, CommitMark, DataLane, Ledger, OffsetMap
from ._upstream import (
    NORMAL_CLOSURE,
    Connector,
    Signal,
    UpdateFeed,
    backoff_delay,
    closed_by,
    rejected,
    websocket_connector,
)

__all__ = [
    "ACK_GRACE",
    "FINISH_TIMEOUT",
    "STOP_TIMEOUT",
    "ClientOptions",
    "RealtimeClient",
    "Totals",
    "open_realtime_client",
]

log = logging.getLogger(__name__)

# Appends waiting for the socket once the connection is ready: beyond this ``append`` blocks,
# which paces the producer at the upstream's speed. 1 s of 24 kHz PCM16 = 48 KB per session.
SEND_QUEUE_BYTES: Final = BYTES_PER_SECOND
# How long ``aclose`` lets the frame in flight finish and the close handshake run before it
# cancels everything and drops the socket (the pipeline wants a cancelled session gone in < 1 s).
STOP_TIMEOUT: Final = 0.5
# Bound on a WebSocket close handshake outside ``aclose``.
CLOSE_TIMEOUT: Final = 2.0
# Once the final commit is out: how long the upstream gets to complete the outstanding items
# (restarted after a reconnect; reaching the connection is bounded by the retry settings).
FINISH_TIMEOUT: Final = 60.0
# How long a commit whose answer is ambiguous (see _answers_commit) waits for another answer
# before the ambiguous one counts. The server was then at most silence_duration_ms of audio
# short of our commit, so an answer of its own would follow within a round trip.
ACK_GRACE: Final = 2.0
# At most one "pre-ready buffer full" warning per engine per this many seconds.
DROP_WARNING_INTERVAL: Final = 10.0

REPLAYED_BYTES = Counter(
    "gateway_openai_replayed_bytes",
    "PCM bytes (24 kHz) sent again to a new upstream session after a reconnect.",
    ["engine"],
    registry=REGISTRY,
)
DROPPED_CHUNKS = Counter(
    "gateway_openai_dropped_chunks",
    "Audio chunks dropped (oldest first) because the pre-ready buffer was full.",
    ["engine"],
    registry=REGISTRY,
)
DROPPED_BYTES = Counter(
    "gateway_openai_dropped_bytes",
    "PCM bytes (24 kHz) dropped because the pre-ready buffer was full.",
    ["engine"],
    registry=REGISTRY,
)
RECONNECTS = Counter(
    "gateway_openai_reconnects",
    "Upstream connection attempts that failed and were retried after a backoff.",
    ["engine"],
    registry=REGISTRY,
)

_connect_websocket: Final = websocket_connector(close_timeout=CLOSE_TIMEOUT)


# -- one upstream connection --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SentCommit:
    # Session offset of the audio it commits up to; its client event_id; its number.
    offset: int
    event_id: str
    seq: int


@dataclass(frozen=True)
class _Retry:
    reason: str
    # Close code to send, or None to drop the socket (peer unresponsive or already gone).
    close_code: int | None = None


@dataclass(frozen=True)
class _Fail:
    error: GatewayError


@dataclass(frozen=True)
class _Done:
    """Finished or stopped on purpose."""


_Outcome = _Retry | _Fail | _Done


class _Close:
    """Sender instruction: close the connection with 1000."""


_CLOSE: Final = _Close()


@dataclass(eq=False)
class _Connection:
    ws: WebSocketConnection
    index: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    outcome: _Outcome | None = None
    control: deque[str] = field(default_factory=deque)
    update_sent: bool = False
    ready: bool = False
    ready_event: trio.Event = field(default_factory=trio.Event)
    # True while a frame is being written: if cancelled then, the stream may hold half a frame.
    in_send: bool = False
    # Audio bytes appended to this upstream session, and how many of them no commit covers yet.
    sent: int = 0
    uncommitted: int = 0
    # Every entry sent and not yet covered: the replay set.
    ledger: Ledger = field(default_factory=Ledger)
    # Where this session's audio sits on our stream, to map upstream times to ours.
    offsets: OffsetMap = field(default_factory=OffsetMap)
    # Commits written and not yet answered, oldest first; how many commits were written.
    pending_commits: deque[_SentCommit] = field(default_factory=deque)
    commits: int = 0
    # Item id -> session offset where its audio ends (speech_stopped, then its commit).
    item_end: dict[str, int] = field(default_factory=dict)
    # Item id -> ``commits`` when its speech_stopped arrived (before its committed).
    stop_seen: dict[str, int] = field(default_factory=dict)
    # Items this upstream session committed (acknowledged, or implied by a transcription).
    committed: set[str] = field(default_factory=set)
    # Server event ids of commit_empty errors that named no commit (to skip duplicates).
    empty_errors: set[str] = field(default_factory=set)
    # Session offset up to which the audio is known to be in committed items.
    covered: int = 0
    last_commit_end: int = 0
    # A committed that may have answered our oldest commit (its seq, the item), and until
    # when another answer is awaited before it counts as the answer.
    maybe_answer: tuple[int, str] | None = None
    grace_until: float = math.inf
    # FINISH_TIMEOUT after the final commit was written to this connection.
    finish_at: float = math.inf
    timers: Signal = field(default_factory=Signal)

    def end(self, outcome: _Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
        self.scope.cancel()

    def seconds(self, session_offset: int) -> float:
        return self.offsets.stream_offset(session_offset) / BYTES_PER_SECOND

    def ms_to_seconds(self, ms: int) -> float:
        return self.seconds(ms * BYTES_PER_MS)

    def record_audio(self, chunk: AudioChunk) -> None:
        self.offsets.note(self.sent, chunk.offset)
        self.ledger.record(self.sent, chunk)
        self.sent += len(chunk.data)
        self.uncommitted += len(chunk.data)


@dataclass
class Totals:
    """Engine-wide counters shared by its clients (also the drop-warning rate limit)."""

    reconnects: int = 0
    replayed_bytes: int = 0
    dropped_chunks: int = 0
    dropped_bytes: int = 0
    unreplayable_bytes: int = 0
    last_drop_warning: float = -math.inf


# -- the client ---------------------------------------------------------------------------------


class ClientOptions(TypedDict, total=False):
    """How a :class:`RealtimeClient` reaches its upstream and reports."""

    api_key: Required[str]
    # The transcription language ("" lets the model tell).
    language: str
    # Opens the socket; None: a real connection.
    connect: Connector | None
    # The label of its log lines and metrics ("openai" by default).
    engine: str
    # Draws the backoff jitter.
    rng: random.Random | None
    # Engine-wide counters this client adds to.
    totals: Totals | None
    # Called each time an upstream session becomes ready.
    on_ready: Callable[[], None] | None


class RealtimeClient:
    """One logical transcription stream over reconnecting upstream sessions (24 kHz PCM16 in).

    Drive it with :meth:`run` in a task (see :func:`open_realtime_client`), feed it with
    :meth:`append`, :meth:`commit` and :meth:`end`, and read :meth:`updates`. Errors are
    :class:`~gateway.errors.GatewayError`s raised from ``updates``, ``append`` and ``wait_ready``.
    """

    def __init__(self, config: OpenAIRealtimeConfig, **options: Unpack[ClientOptions]) -> None:
        self._cfg = config
        self._headers = [(b"Authorization", b"Bearer " + options["api_key"].encode())]
        self._update_frame = encode_client_event(
            build_session_update(config, language=options.get("language", ""))
        )
        self._manual = config.turn_detection == "none"
        # Silence the server VAD waits for before it ends a turn by itself.
        self._silence_bytes = config.vad_silence_duration_ms * BYTES_PER_MS
        self._connect = options.get("connect") or _connect_websocket
        self._label = options.get("engine", "openai")
        self._rng = options.get("rng") or random.Random()
        self._totals = options.get("totals") or Totals()
        self._on_ready = options.get("on_ready")

        self._lane = DataLane(config.buffer_bytes)
        self._assembler = TranscriptAssembler()
        self._conn: _Connection | None = None
        self._stream_bytes = 0
        self._processed = 0.0
        self._attempt = 0
        # A connection of the current series reached session.updated.
        self._ready_seen = False
        self._ended = False
        self._final_out = False
        self._finished = False
        self._closing = False
        self._hard_stop = False
        self._started = False

        self._results = UpdateFeed()

        self._run_scope = trio.CancelScope(shield=True)
        self._close_scope: trio.CancelScope | None = None
        self._first_ready = trio.Event()
        self._stop_event = trio.Event()
        self._done = trio.Event()
        self._wakeup = Signal()
        self._space = Signal()

        self.connections = 0
        self.reconnects = 0
        self.replayed_bytes = 0
        self.dropped_chunks = 0
        self.dropped_bytes = 0
        self.pongs = 0

    # -- producer side ------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing or self._done.is_set():
            raise UpstreamError("the upstream session is closed")
        if self._ended:
            raise RuntimeError("audio after end()")

    @property
    def ready(self) -> bool:
        return self._conn is not None and self._conn.ready

    async def append(self, pcm: bytes) -> None:
        """Queue 24 kHz PCM16; blocks while ready and the send queue is full (backpressure)."""
        self._check_usable()
        if len(pcm) % 2:
            raise ValueError("PCM16 audio must hold whole samples (an even number of bytes)")
        while self.ready and self._lane.audio_bytes >= SEND_QUEUE_BYTES:
            await self._space.wait()
            self._check_usable()
        if not pcm:
            return
        chunk = AudioChunk(pcm, self._stream_bytes)
        self._stream_bytes += len(pcm)
        dropped = self._lane.push_audio(chunk, bounded=not self.ready)
        self._count_drops(*dropped)
        self._wakeup.fire()

    def commit(self) -> None:
        """Commit the audio appended so far (a barrier in the data lane)."""
        self._check_usable()
        self._lane.push_commit(CommitMark(pre_ready=not self.ready), coalesce=not self.ready)
        self._wakeup.fire()

    def end(self) -> None:
        """No more audio: commit the rest and finish once every item has completed."""
        if self._ended:
            return
        self._check_usable()
        self._ended = True
        self._lane.push_commit(
            CommitMark(pre_ready=not self.ready, final=True), coalesce=not self.ready
        )
        self._wakeup.fire()

    def _count_drops(self, chunks: int, nbytes: int) -> None:
        if not chunks:
            return
        self.dropped_chunks += chunks
        self.dropped_bytes += nbytes
        totals = self._totals
        totals.dropped_chunks += chunks
        totals.dropped_bytes += nbytes
        DROPPED_CHUNKS.labels(self._label).inc(chunks)
        DROPPED_BYTES.labels(self._label).inc(nbytes)
        now = trio.current_time()
        if now - totals.last_drop_warning >= DROP_WARNING_INTERVAL:
            totals.last_drop_warning = now
            log.warning(
                "%s: upstream not ready and the %d-byte pre-ready buffer is full; dropping the "
                "oldest audio (dropped_chunks=%d dropped_bytes=%d)",
                self._label,
                self._lane.cap,
                totals.dropped_chunks,
                totals.dropped_bytes,
                extra={
                    "dropped_chunks": totals.dropped_chunks,
                    "dropped_bytes": totals.dropped_bytes,
                },
            )

    # -- consumer side ------------------------------------------------------------------------
    async def wait_ready(self) -> None:
        """Return once the first upstream session is ready; raise if the client failed first."""
        await self._first_ready.wait()
        if self._error is not None:
            raise self._error
        if self._done.is_set() and not self._finished:
            raise UpstreamUnavailable("the upstream session closed before it was ready")

    def updates(self) -> AsyncIterator[EngineUpdate]:
        """Cumulative updates (conflated: a slow reader gets the latest); ends after the final."""
        return self._results.updates()

    @property
    def _error(self) -> GatewayError | None:
        return self._results.failure

    def _publish(self, *, final: bool = False) -> None:
        self._results.publish(self._assembler.snapshot(self._processed, final=final), final=final)

    def _fail(self, error: GatewayError) -> None:
        if self._error is None and not self._finished and not self._closing:
            log.warning("%s: %s: %s", self._label, error.code, error.detail)
            self._results.fail(error)
            self._space.fire()

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, reconnect and stream until finished, failed or stopped. Never raises
        (failures are reported through ``updates``), except when cancelled by ``aclose``."""
        self._started = True
        try:
            with self._run_scope:
                with trio.move_on_after(self._cfg.session_timeout) as session_scope:
                    await self._run_connections()
                if session_scope.cancelled_caught:
                    self._fail(Timeout(f"session exceeded {self._cfg.session_timeout:g} s"))
            if not (self._finished or self._closing or self._error is not None):
                self._fail(UpstreamError("the upstream session ended unexpectedly"))
        finally:
            self._conn = None
            self._clear_state()
            self._done.set()
            self._first_ready.set()
            self._space.fire()

    def _finish_timed_out(self, conn: _Connection) -> None:
        """FINISH_TIMEOUT after the final commit went out on ``conn``, which is still up.

        Decided here, on the live connection: once it is lost, its audio is queued for
        replay and its incomplete items are gone, and nothing could tell a missing
        acknowledgement from a missing transcript any more.
        """
        if self._finished or self._closing or self._error is not None:
            return
        if self._assembler.drop_uncommitted():
            self._publish()
        incomplete = self._assembler.incomplete
        if incomplete:
            self._end(
                conn,
                _Fail(
                    Timeout(
                        f"{incomplete} items still incomplete {FINISH_TIMEOUT:g} s "
                        "after the end of the audio"
                    )
                ),
            )
            return
        # Every item is complete; only acknowledgements never came.
        log.warning(
            "%s: %d commits unanswered %g s after the end of the audio; "
            "finishing with the transcript",
            self._label,
            len(conn.pending_commits),
            FINISH_TIMEOUT,
        )
        self._finish()

    def _finish(self) -> None:
        self._finished = True
        self._publish(final=True)
        self._wakeup.fire()

    async def aclose(self) -> None:
        """Stop: clear all state now, close with 1000 within ``STOP_TIMEOUT``. Idempotent."""
        if not self._closing:
            self._closing = True
            self._clear_state()
            self._stop_event.set()
            self._wakeup.fire()
            self._space.fire()
            self._results.stop()
        if not self._started:
            self._done.set()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(STOP_TIMEOUT):
                await self._done.wait()
            if not self._done.is_set():
                self._hard_stop = True
                self._run_scope.cancel()
                if self._close_scope is not None:
                    self._close_scope.cancel()
                await self._done.wait()

    def _clear_state(self) -> None:
        self._lane.clear()
        conn = self._conn
        if conn is not None:
            conn.ledger.clear()
            conn.control.clear()
            conn.pending_commits.clear()
            conn.ready = False
        self._ended = False
        self._final_out = False

    def state(self) -> dict[str, Any]:
        """What the client still holds (for tests and debugging)."""
        conn = self._conn
        return {
            "lane_entries": len(self._lane),
            "lane_bytes": self._lane.audio_bytes,
            "ledger_entries": len(conn.ledger) if conn else 0,
            "control": len(conn.control) if conn else 0,
            "pending_commits": len(conn.pending_commits) if conn else 0,
            "ready": self.ready,
            "ended": self._ended,
            "running": self._started and not self._done.is_set(),
        }

    # -- connections --------------------------------------------------------------------------
    async def _run_connections(self) -> None:
        while not (self._closing or self._finished or self._error is not None):
            outcome = await self._connect_once()
            if isinstance(outcome, _Fail):
                self._fail(outcome.error)
                return
            if isinstance(outcome, _Done) or self._closing or self._finished:
                return
            # ``_attempt`` counts failed connection attempts since the last session.updated.
            # Why only that resets it: a socket that opens and then dies before the session is
            # usable is a failed attempt, however fast the TCP connect was. Losing a session
            # that was ready is not a failed attempt; it starts a new series of reconnects.
            if not self._ready_seen:
                self._attempt += 1
            self._ready_seen = False
            if self._attempt >= self._cfg.max_attempts:
                self._fail(
                    UpstreamUnavailable(
                        f"gave up after {self._attempt} failed attempts: {outcome.reason}"
                    )
                )
                return
            delay = backoff_delay(
                max(self._attempt, 1),
                self._cfg.backoff_initial,
                self._cfg.backoff_max,
                self._rng,
            )
            self.reconnects += 1
            self._totals.reconnects += 1
            RECONNECTS.labels(self._label).inc()
            log.warning(
                "%s: %s; reconnecting in %.2f s (attempt %d of %d)",
                self._label,
                outcome.reason,
                delay,
                self._attempt + 1,
                self._cfg.max_attempts,
            )
            with trio.move_on_after(delay):
                await self._stop_event.wait()

    async def _connect_once(self) -> _Outcome:
        conn: _Connection | None = None
        failure: _Outcome | None = None
        try:
            async with self._connect(
                self._cfg.url,
                extra_headers=self._headers,
                connect_timeout=self._cfg.connect_timeout,
            ) as ws:
                conn = _Connection(ws, self.connections)
                self.connections += 1
                self._conn = conn
                try:
                    async with trio.open_nursery() as nursery:
                        conn.scope = nursery.cancel_scope
                        for task in (
                            self._receiver,
                            self._sender,
                            self._heartbeat,
                            self._watchdog,
                            self._finish_watch,
                        ):
                            nursery.start_soon(self._guard, task, conn)
                finally:
                    await self._close_socket(conn)
        # The one boundary where trio-websocket's and the network's errors become outcomes.
        except ConnectionRejected as exc:
            failure = _rejected(exc)
        except HandshakeError as exc:
            failure = _Retry(f"cannot connect to {self._cfg.url}: {exc!r}")
        except (
            ConnectionClosed,
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            failure = _Retry(f"connection failed: {exc!r}")
        except Exception as exc:
            log.exception("%s: cannot use upstream %s", self._label, self._cfg.url)
            error = UpstreamError(f"cannot use upstream {self._cfg.url}: {exc!r}")
            error.__cause__ = exc
            failure = _Fail(error)
        finally:
            if conn is not None:
                self._connection_lost(conn)
        if conn is not None and conn.outcome is not None:
            return conn.outcome
        return failure or _Retry("connection ended")

    async def _guard(self, task: Callable[[_Connection], Any], conn: _Connection) -> None:
        try:
            await task(conn)
        except Exception as exc:
            log.exception("%s: internal error in %s", self._label, task.__name__)
            error = UpstreamError(f"internal error in the OpenAI client: {exc!r}")
            error.__cause__ = exc
            self._end(conn, _Fail(error))

    def _end(self, conn: _Connection, outcome: _Outcome) -> None:
        if conn.outcome is None and isinstance(outcome, _Fail):
            self._fail(outcome.error)
        conn.end(outcome)

    async def _close_socket(self, conn: _Connection) -> None:
        outcome = conn.outcome
        if isinstance(outcome, _Retry):
            code = outcome.close_code
        else:
            code = None if outcome is None else 1000
        forced = code is None or conn.in_send or self._hard_stop
        with trio.CancelScope(shield=True) as scope:
            self._close_scope = scope
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            if not forced:
                assert code is not None
                await conn.ws.aclose(code)
        self._close_scope = None
        if forced or scope.cancelled_caught:
            # Half a frame may be on the wire, or the peer stopped reading: a close frame
            # could not be delivered intact, so drop the transport.
            await trio.aclose_forcefully(conn.ws)

    def _connection_lost(self, conn: _Connection) -> None:
        self._conn = None
        conn.ready = False
        if not (self._closing or self._finished or self._error is not None):
            # Replay: what was sent but not covered goes back, in order, ahead of unsent audio.
            self._lane.prepend(conn.ledger.take_replay())
            self._count_drops(*self._lane.enforce_cap())
            # Items of the lost session that had not completed are gone with it; their audio
            # is in the replay.
            self._assembler.discard_unstable()
            if self._ended and not (
                isinstance(self._lane.last, CommitMark) and self._lane.last.final
            ):
                self._lane.push_commit(CommitMark(final=True), coalesce=False)
            self._final_out = False
            self._publish()
        conn.ledger.clear()
        conn.control.clear()
        conn.pending_commits.clear()
        self._space.fire()

    # -- connection tasks ---------------------------------------------------------------------
    async def _watchdog(self, conn: _Connection) -> None:
        with trio.move_on_after(self._cfg.connect_timeout):
            await conn.ready_event.wait()
            return
        self._end(conn, _Retry(f"no session.updated within {self._cfg.connect_timeout:g} s", 1000))

    async def _finish_watch(self, conn: _Connection) -> None:
        """Runs the connection's two timers: the ack grace and the finish deadline."""
        while True:
            with trio.move_on_at(min(conn.grace_until, conn.finish_at)):
                await conn.timers.wait()
                continue
            now = trio.current_time()
            if now >= conn.grace_until:
                self._grace_expired(conn)
            if now >= conn.finish_at:
                self._finish_timed_out(conn)
                return

    async def _heartbeat(self, conn: _Connection) -> None:
        while True:
            await trio.sleep(self._cfg.ping_interval)
            with trio.move_on_after(self._cfg.ping_timeout) as scope:
                try:
                    await conn.ws.ping()
                except ConnectionClosed as exc:
                    self._on_closed(conn, exc)
                    return
            if scope.cancelled_caught:
                self._end(conn, _Retry(f"no pong within {self._cfg.ping_timeout:g} s"))
                return
            self.pongs += 1

    async def _receiver(self, conn: _Connection) -> None:
        while True:
            try:
                message = await conn.ws.get_message()
            except ConnectionClosed as exc:
                self._on_closed(conn, exc)
                return
            self._on_message(conn, message)

    async def _sender(self, conn: _Connection) -> None:
        while True:
            frame = self._next_frame(conn)
            if isinstance(frame, _Close):
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await conn.ws.aclose(1000)
                self._end(conn, _Done())
                return
            if frame is None:
                self._maybe_finish()
                if self._closing or self._finished:
                    continue
                await self._wakeup.wait()
                continue
            conn.in_send = True
            try:
                await conn.ws.send_message(frame)
            except ConnectionClosed as exc:
                conn.in_send = False
                self._on_closed(conn, exc)
                return
            conn.in_send = False

    def _next_frame(self, conn: _Connection) -> str | _Close | None:
        """The next frame to write, by lane priority; ``None`` when there is nothing to send."""
        if self._closing or self._finished:
            return _CLOSE
        if conn.control:
            conn.update_sent = True
            return conn.control.popleft()
        if not conn.ready:
            return None
        while (entry := self._lane.popleft()) is not None:
            self._space.fire()
            if isinstance(entry, AudioChunk):
                conn.record_audio(entry)
                if entry.replay:
                    self.replayed_bytes += len(entry.data)
                    self._totals.replayed_bytes += len(entry.data)
                    REPLAYED_BYTES.labels(self._label).inc(len(entry.data))
                lost = conn.ledger.trim(self._cfg.buffer_bytes)
                self._totals.unreplayable_bytes += lost
                end = (entry.offset + len(entry.data)) / BYTES_PER_SECOND
                self._processed = max(self._processed, end)
                return encode_append(entry.data)
            if entry.final:
                # The clock for the upstream to finish starts now, on a ready connection.
                self._final_out = True
                conn.finish_at = trio.current_time() + FINISH_TIMEOUT
                conn.timers.fire()
            if conn.uncommitted < MIN_COMMIT_BYTES:
                # Less than 100 ms would be rejected with commit_empty: nothing to commit.
                continue
            conn.ledger.record(conn.sent, entry)
            sent = _SentCommit(conn.sent, f"commit_{conn.index}_{conn.commits}", conn.commits)
            conn.pending_commits.append(sent)
            conn.commits += 1
            conn.uncommitted = 0
            return encode_commit(sent.event_id)
        return None

    # -- server events ------------------------------------------------------------------------
    def _on_closed(self, conn: _Connection, exc: ConnectionClosed) -> None:
        if self._closing or self._finished or conn.outcome is not None:
            conn.end(_Done())
            return
        closed = closed_by(exc)
        # A normal closure while we still have work is how a server drains or ends an
        # expiring session: reconnect, as after a transient close.
        if closed.transient or closed.code == NORMAL_CLOSURE:
            self._end(conn, _Retry(f"upstream closed with {closed}"))
        else:
            self._end(conn, _Fail(UpstreamError(f"upstream closed the session with {closed}")))

    def _on_message(self, conn: _Connection, message: str | bytes) -> None:
        try:
            event = decode_server_event(message)
        except msgspec.MsgspecError as exc:
            log.warning("%s: ignoring a malformed upstream event: %s", self._label, exc)
            return
        match event:
            case None:
                return
            case SessionCreated():
                if not conn.update_sent and not conn.control:
                    conn.control.append(self._update_frame)
                    self._wakeup.fire()
                return
            case SessionUpdated():
                if not conn.ready:
                    self._on_session_ready(conn)
                return
            case ErrorEvent():
                self._on_error(conn, event)
            case Committed():
                self._on_committed(conn, event)
            case TranscriptionFailed(item_id=item_id, error=info):
                self._imply_commit(conn, item_id)
                apply_event(self._assembler, event)
                self._publish()
                self._end(
                    conn,
                    _Fail(
                        UpstreamError(
                            f"transcription of item {item_id} failed: "
                            f"{info.code or info.type}: {info.message}"
                        )
                    ),
                )
                return
            case SpeechStopped(item_id=item_id, audio_end_ms=ms):
                if item_id not in conn.committed:
                    conn.item_end[item_id] = ms * BYTES_PER_MS
                    conn.stop_seen[item_id] = conn.commits
                apply_event(self._assembler, event, seconds=conn.ms_to_seconds)
            case TranscriptionDelta(item_id=item_id) | TranscriptionCompleted(item_id=item_id):
                self._imply_commit(conn, item_id)
                apply_event(self._assembler, event, seconds=conn.ms_to_seconds)
            case _:
                apply_event(self._assembler, event, seconds=conn.ms_to_seconds)
        last = self._assembler.last_stable_id
        if last is not None and last in conn.item_end:
            conn.ledger.cover(conn.item_end[last])
        self._publish()
        self._maybe_finish()

    def _on_session_ready(self, conn: _Connection) -> None:
        conn.ready = True
        conn.ready_event.set()
        self._attempt = 0
        self._ready_seen = True
        self._first_ready.set()
        if self._on_ready is not None:
            self._on_ready()
        self._wakeup.fire()
        self._space.fire()

    def _on_error(self, conn: _Connection, event: ErrorEvent) -> None:
        info = event.error
        if info.code == COMMIT_EMPTY:
            self._on_commit_empty(conn, event)
            return
        if info.code == SESSION_EXPIRED:
            self._end(conn, _Retry("upstream session expired", 1000))
            return
        detail = f"{info.type}/{info.code}: {info.message}" if info.code else info.message
        if not conn.ready:
            if info.type == INVALID_REQUEST:
                self._end(conn, _Fail(UpstreamError(f"upstream rejected the session: {detail}")))
            else:
                self._end(conn, _Retry(f"upstream error before ready: {detail}", 1000))
            return
        self._end(conn, _Fail(UpstreamError(f"upstream error: {detail}")))

    # -- acknowledgements ---------------------------------------------------------------------
    # Each commit we write is answered once, in order: by ``committed`` for the item it
    # closes or creates, or by commit_empty. With server VAD the server also commits on its
    # own (speech_stopped, then committed), and a commit that closes a speech run the VAD has
    # open may come with speech_stopped before or after its committed, or none; answers may
    # be duplicated or missing, and they interleave with transcripts of earlier items. The
    # rules below take no order for granted; see _answers_commit.

    def _on_commit_empty(self, conn: _Connection, event: ErrorEvent) -> None:
        """Benign: the buffer held under 100 ms (server VAD had committed the rest)."""
        named = event.error.event_id
        if named:
            # It names the commit it answers; one no longer pending was answered already.
            seqs = [c.seq for c in conn.pending_commits if c.event_id == named]
            if not seqs:
                return
            answered = seqs[0]
        else:
            if event.event_id and event.event_id in conn.empty_errors:
                return
            if event.event_id:
                conn.empty_errors.add(event.event_id)
            if not conn.pending_commits:
                return
            answered = conn.pending_commits[0].seq
        # Answers come in order: older commits still pending will never be answered.
        commit = conn.pending_commits.popleft()
        while commit.seq < answered:
            commit = conn.pending_commits.popleft()
        conn.covered = max(conn.covered, commit.offset)
        conn.uncommitted = min(conn.uncommitted, conn.sent - commit.offset)

    def _imply_commit(self, conn: _Connection, item_id: str) -> None:
        """A transcription only ever runs on committed audio: a transcript of an item this
        session never acknowledged means its ``committed`` is missing; act as if it came."""
        if item_id not in conn.committed:
            self._on_committed(conn, Committed(item_id=item_id))

    def _answers_commit(self, conn: _Connection, item_id: str, commit: _SentCommit) -> bool | None:
        """Is ``committed`` for ``item_id`` the answer to our oldest pending ``commit``, rather
        than the server VAD ending a turn by itself? ``None``: it cannot be told yet.

        A VAD turn is committed only after its speech_stopped, whose audio_end_ms is where
        the VAD decided (OpenAI: the end of the speech plus silence_duration_ms) or, on some
        servers, where the speech ended. A commit that closes an open speech run is answered
        with a speech_stopped at the commit point, or at the end of the speech, so within
        silence_duration_ms of it (the VAD had not heard that much silence yet).
        """
        if self._manual:
            return True
        stop_seen = conn.stop_seen.get(item_id)
        if stop_seen is None:
            # A VAD turn would have had its speech_stopped first: none came (yet).
            return True
        if stop_seen <= commit.seq:
            # speech_stopped arrived before we wrote the commit: the VAD ended that turn.
            return False
        if conn.item_end[item_id] + self._silence_bytes > commit.offset:
            # The VAD's decision point (then the answer to our commit is still to come), or
            # the commit point or the end of the speech our commit cut short (then nothing
            # more will come). At the commit point, _maybe_finish need not wait: no answer
            # can add an item with under 100 ms left.
            return None
        return False

    def _on_committed(self, conn: _Connection, event: Committed) -> None:
        item_id = event.item_id
        if item_id in conn.committed:
            # A duplicate (or the ack after a transcript implied it): it may refine the
            # order of items, but it answers nothing.
            apply_event(self._assembler, event, seconds=conn.ms_to_seconds)
            return
        conn.committed.add(item_id)
        oldest = conn.pending_commits[0] if conn.pending_commits else None
        answers = oldest is not None and self._answers_commit(conn, item_id, oldest)
        if oldest is not None and answers:
            conn.pending_commits.popleft()
            end = oldest.offset
            conn.covered = max(conn.covered, end)
        else:
            # The VAD's own turn, committed up to its speech_stopped (or all we sent).
            end = conn.item_end.get(item_id, conn.sent)
            conn.covered = max(conn.covered, min(end, conn.sent))
            conn.uncommitted = min(conn.uncommitted, max(0, conn.sent - end))
            if oldest is not None and answers is None:
                conn.maybe_answer = (oldest.seq, item_id)
                conn.grace_until = trio.current_time() + ACK_GRACE
                conn.timers.fire()
        conn.item_end[item_id] = end
        start, conn.last_commit_end = conn.last_commit_end, end
        apply_event(
            self._assembler,
            event,
            seconds=conn.ms_to_seconds,
            commit_start=conn.seconds(start),
            commit_end=conn.seconds(end),
        )

    def _grace_expired(self, conn: _Connection) -> None:
        """No other answer came: the ambiguous committed was the answer to our commit."""
        conn.grace_until = math.inf
        maybe, conn.maybe_answer = conn.maybe_answer, None
        if maybe is None or not conn.pending_commits:
            return
        seq, item_id = maybe
        commit = conn.pending_commits[0]
        if commit.seq != seq:
            return
        conn.pending_commits.popleft()
        conn.covered = max(conn.covered, commit.offset)
        conn.item_end[item_id] = max(conn.item_end[item_id], commit.offset)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        conn = self._conn
        if (
            not self._ended
            or self._finished
            or self._closing
            or conn is None
            or not conn.ready
            or not self._final_out
            or len(self._lane)
        ):
            return
        if conn.pending_commits:
            # An answer is outstanding. If less than 100 ms of audio is in no committed
            # item, no answer can add an item (the server rejects so short a commit): only
            # the acknowledgement is missing, and the transcript does not wait for it.
            if conn.sent - conn.covered >= MIN_COMMIT_BYTES:
                return
        elif self._assembler.drop_uncommitted():
            # Our last commit is answered: speech the server saw start but never committed
            # (cut by the end of the audio, under 100 ms) will never complete.
            self._publish()
        if self._assembler.incomplete:
            return
        self._finish()


def _rejected(exc: ConnectionRejected) -> _Outcome:
    refusal = rejected(exc)
    status, body = refusal.status, refusal.body
    if refusal.transient:
        return _Retry(f"upstream refused the connection with HTTP {status}")
    if refusal.credentials:
        error: GatewayError = UpstreamUnavailable(
            f"upstream rejected the credentials with HTTP {status}: {body}"
        )
    else:
        error = UpstreamError(f"upstream refused the connection with HTTP {status}: {body}")
    error.__cause__ = exc
    return _Fail(error)


@asynccontextmanager
async def open_realtime_client(
    config: OpenAIRealtimeConfig,
    *,
    wait_ready: bool = True,
    **options: Unpack[ClientOptions],
) -> AsyncIterator[RealtimeClient]:
    """Run a :class:`RealtimeClient` for the duration of the block; stop it on the way out.

    With ``wait_ready`` the block starts once the first upstream session is ready, and a
    failure to get there (bad key, retries exhausted) is raised here instead.
    """
    client = RealtimeClient(config, **options)
    # ``run`` never raises, so an exception group here holds the block's exception (or
    # wait_ready's): callers get it as itself.
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            try:
                if wait_ready:
                    await client.wait_ready()
                yield client
            finally:
                await client.aclose()
