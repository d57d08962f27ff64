"""The OpenAI Realtime-compatible transcription endpoint: ``GET /v1/realtime?intent=transcription``,
a WebSocket in the GA shape, on any engine.

A Realtime client (the openai SDK's ``client.realtime.connect(extra_query={"intent":
"transcription"})``, or an app written for ``wss://api.openai.com/v1/realtime``) points its base
URL at the gateway. The server sends ``session.created``; the client may send ``session.update``
(``audio.input.format``: ``audio/pcm`` at 24 kHz, ``audio/pcmu`` or ``audio/pcma``;
``audio.input.transcription.model``: an engine or an ``openai.aliases`` name, ``language``;
``prompt`` is accepted and ignored; ``audio.input.turn_detection``: ``server_vad`` or null for
manual commits; the default is server VAD, as OpenAI's; an update applies from the next turn
on), then ``input_audio_buffer.append`` / ``.commit`` / ``.clear``. Wire frames are decoded and
encoded by :mod:`gateway.api._realtime_wire`; this module does the I/O.

How turns map onto the pipeline: one job per turn. A turn starts with the first audio appended
after the previous commit (or clear); it gets its item id then, and a :class:`LiveSource` that
the appends feed, so the engine transcribes while the client speaks. A commit (the client's, or
server VAD's after ``silence_duration_ms`` of silence) ends that source: the job finishes, its
transcript is stored under its random id like any live session, and its text is the item's
``completed`` transcript. Why not one engine session for the whole connection: an engine commits
text when it likes (at a pause, or only at the end), so a turn's text would not be final when the
client commits it, and the item could never complete before the socket closes; ending the
source is the one signal every engine turns into final text. Why it keeps one pipeline: each turn
is an ordinary job (admission with queue positions, tenant stream limit, the engine, the store,
metrics, shutdown), fed by the same live source as ``/v1/transcriptions/live``.

Ordering: a turn's job is prepared only once the previous turn's job has ended, so a connection
holds at most one engine session (and one of its tenant's streams) at a time, and items complete
in the order they were committed; the next turn's audio waits meanwhile in its source's bounded
channel (backpressure, as for the native endpoint). Committed text is sent as ``delta`` events
once the item is committed; ``completed`` (with ``usage`` ``{type: "duration", seconds}``) and
``conversation.item.done`` follow the job's end; a job that fails gives
``conversation.item.input_audio_transcription.failed`` with the gateway's error code.

While a turn waits for a place at its engine, the server sends ``{"type": "gateway.queued",
"item_id", "position"}`` (1 = next); clients ignore event types they do not know.

Client mistakes (a frame that is not JSON, an unknown event type, a bad setting, a commit of less
than 100 ms: ``input_audio_buffer_commit_empty``) are ``error`` events in OpenAI's shape; the
socket stays open. A beta-shaped client (the ``OpenAI-Beta: realtime=v1`` header, or a
``transcription_session.update``) gets OpenAI's current answer, ``beta_api_shape_disabled``, then
close code 4000. Refusals before the upgrade (a missing key, a query without
``intent=transcription``, a draining gateway) are HTTP answers in OpenAI's error shape. When the
gateway stops, a turn in progress gets an ``error`` event (``shutting_down``), then close 1001.

A client that leaves a turn open (audio appended, no commit) and sends nothing for
``server.live_idle_timeout`` seconds gets an ``error`` event (``invalid_request_error``, code
``timeout``), then close 4408, as the native endpoint closes an idle stream; the open turn is
dropped (nothing of it stored), and so are committed turns still being transcribed, as when a
client leaves. OpenAI documents no server-side idle close for a transcription session (server
VAD's ``idle_timeout_ms`` commits a turn; it is no close), so the choice is the gateway's: an
``error`` in OpenAI's shape, then the close. No ``transcription.failed``: the open turn was never
committed, so it never became an item the client knows.

Like the native live route, this WebSocket route is not in the OpenAPI document (OpenAPI
describes HTTP operations; :mod:`gateway.openapi` lists only the app's HTTP routes).

A client that leaves cancels the turn's job at once: its engine session is closed and nothing of
that turn is stored (turns completed before stay stored).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import anyio
import numpy as np
from starlette.routing import WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket

from ..engines._resample import PcmResampler
from ..engines.vad import WINDOW_SAMPLES, SileroVad, silero_session
from ..errors import BadRequest, GatewayError, ShuttingDown, Timeout, status_of
from ..events import Done, Failed, Progress, Queued, join_text
from ..jobs import GatewayState, JobOptions, prepare_job
from ..live_audio import PcmStream
from ..pipeline import Outbox, attend
from ..sources import LiveSource
from . import _realtime_wire as wire
from .openai_compat import error_response

__all__ = ["PATH", "routes"]

PATH = "/v1/realtime"
# The subprotocol browsers offer (with "openai-insecure-api-key.<key>"); echoed when offered.
SUBPROTOCOL = "realtime"
# Beta close code: what OpenAI closes a beta-shaped socket with.
BETA_CLOSE = 4000
# After SHUTTING_DOWN: the gateway is stopping.
GOING_AWAY = 1001
# After an idle open turn's ``timeout`` error: the native live endpoint's TIMEOUT close code.
IDLE_CLOSE = 4408
VAD_RATE = 16_000


@dataclass(eq=False)
class _Turn:
    """The audio between two commits: one item, one job."""

    item_id: str
    settings: wire.Settings
    source: LiveSource
    previous: anyio.Event | None
    bytes_in: int = 0
    committed: anyio.Event = field(default_factory=anyio.Event)
    finished: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    previous_item_id: str | None = None
    # The committed text sent as deltas so far.
    sent: str = ""

    @property
    def ms(self) -> float:
        return self.bytes_in / self.settings.bytes_per_ms


class _Vad:
    """Server VAD over the client's audio: resampled to 16 kHz, Silero per 32 ms window."""

    def __init__(self, settings: wire.Settings, session: object) -> None:
        assert settings.turn_detection is not None
        self.detector = wire.TurnDetector(settings.turn_detection)
        self._resampler = PcmResampler(settings.rate, VAD_RATE)
        self._silero = SileroVad(session)
        self._pending = b""

    async def push(self, pcm: bytes) -> list[tuple[str, int]]:
        self._pending += self._resampler.push(pcm)
        usable = len(self._pending) // (2 * WINDOW_SAMPLES) * (2 * WINDOW_SAMPLES)
        if not usable:
            return []
        chunk, self._pending = self._pending[:usable], self._pending[usable:]
        audio = np.frombuffer(chunk, dtype="<i2").astype(np.float32) / 32768.0
        probs = await anyio.to_thread.run_sync(self._silero.probabilities, audio)
        return self.detector.push(probs)


class _Connection:
    def __init__(self, websocket: WebSocket, state: GatewayState) -> None:
        self.ws = websocket
        self.state = state
        self.tenant: str = websocket.scope.get("state", {}).get("tenant", "")
        self.session_id = "sess_" + secrets.token_hex(12)
        self.settings = wire.Settings(model=state.config.server.default_engine)
        self.models = frozenset((*state.engines, *state.config.openai.aliases))
        self.turn: _Turn | None = None
        self.last_finished: anyio.Event | None = None
        self.last_item_id: str | None = None
        self.vad: _Vad | None = None
        self._events = 0
        self._lock = anyio.Lock()
        self._scope = anyio.CancelScope()

    def _event_id(self) -> str:
        self._events += 1
        return f"event_{self.session_id[5:17]}{self._events:06d}"

    async def send(self, text: str) -> None:
        async with self._lock:
            await self.ws.send_text(text)

    async def error(self, error: wire.WireError) -> None:
        await self.send(wire.error_event(self._event_id(), error))

    async def run(self) -> None:
        await self.send(
            wire.session_event("session.created", self._event_id(), self.session_id, self.settings)
        )
        async with anyio.create_task_group() as tg:
            self._scope = tg.cancel_scope
            await self._read(tg)
            tg.cancel_scope.cancel()

    async def _going_away(self, final: Failed) -> None:
        """The gateway stops: an ``error`` event now (the turn may never be committed), then
        close 1001, as the native live endpoint does."""
        error = wire.WireError(final.code.lower(), final.detail, kind="server_error")
        await self.send(wire.error_event(self._event_id(), error))
        await self.ws.close(GOING_AWAY, final.code)
        self._scope.cancel()

    async def _idle(self) -> None:
        """The client left a turn open and sent nothing for ``server.live_idle_timeout``: an
        ``error`` event (``timeout``), then close 4408, as the native live endpoint closes an
        idle stream. The open turn (never committed, so never an item) is cancelled with the
        connection, like a client that leaves."""
        idle = self.state.config.server.live_idle_timeout
        detail = f"no audio or commit from the client for {idle:g} s with a turn open"
        await self.error(wire.WireError(Timeout.code.lower(), detail))
        await self.ws.close(IDLE_CLOSE, Timeout.code)

    async def _read(self, tg: anyio.abc.TaskGroup) -> None:
        idle = self.state.config.server.live_idle_timeout
        while True:
            message: Message | None = None
            # Idle only while a turn is open: the server owes a client between turns their text
            # (a slow engine is no idle client), and such a client holds no open turn's job.
            with anyio.move_on_after(idle if self.turn is not None else math.inf):
                message = await self.ws.receive()
            if message is None:
                await self._idle()
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            try:
                if text is None:
                    raise wire.WireError("invalid_json", "events are JSON in text frames")
                event = wire.decode_client_event(text)
                await self._handle(event, tg)
            except wire.WireError as exc:
                await self.error(exc)
                if exc.info.code == wire.BETA_CODE:
                    await self.ws.close(BETA_CLOSE, wire.BETA_CODE)
                    return

    async def _handle(self, event: wire.ClientEvent, tg: anyio.abc.TaskGroup) -> None:
        if isinstance(event, wire.Append):
            await self._append(wire.decode_audio(event), tg)
        elif isinstance(event, wire.Commit):
            await self._commit(event.event_id)
        elif isinstance(event, wire.Clear):
            if self.turn is not None:
                self.turn.scope.cancel()
                self.turn = None
            await self.send(wire.cleared(self._event_id()))
        else:
            self.settings = wire.merge_update(self.settings, event, self.models)
            self.vad = None
            await self.send(
                wire.session_event(
                    "session.updated", self._event_id(), self.session_id, self.settings
                )
            )

    async def _append(self, audio: bytes, tg: anyio.abc.TaskGroup) -> None:
        if not audio:
            return
        turn = self.turn
        if turn is None:
            source = LiveSource(PcmStream(self.settings.rate))
            turn = _Turn("item_" + secrets.token_hex(12), self.settings, source, self.last_finished)
            self.turn, self.last_finished = turn, turn.finished
            tg.start_soon(self._run_turn, turn)
        turn.bytes_in += len(audio)
        pcm = wire.g711_to_pcm(turn.settings.format, audio)
        await turn.source.push(pcm)
        if self.settings.turn_detection is None:
            return
        if self.vad is None:
            # The network loads once per process: not on the event loop.
            self.vad = _Vad(self.settings, await anyio.to_thread.run_sync(silero_session))
        for kind, ms in await self.vad.push(pcm):
            if kind == "started":
                await self.send(wire.speech_started(self._event_id(), turn.item_id, ms))
            else:
                await self.send(wire.speech_stopped(self._event_id(), turn.item_id, ms))
                await self._commit(None)

    async def _commit(self, event_id: str | None) -> None:
        turn = self.turn
        if turn is None or turn.ms < wire.MIN_COMMIT_MS:
            raise wire.commit_empty(turn.ms if turn is not None else 0.0, event_id)
        self.turn = None
        turn.source.end()
        turn.previous_item_id, self.last_item_id = self.last_item_id, turn.item_id
        await self.send(wire.committed(self._event_id(), turn.item_id, turn.previous_item_id))
        await self.send(wire.item_added(self._event_id(), turn.item_id, turn.previous_item_id))
        turn.committed.set()

    async def _run_turn(self, turn: _Turn) -> None:
        """The turn's job, after the previous turn's; then, once committed, its item's final
        events. A clear cancels all of it (only an uncommitted turn can be cleared)."""
        with turn.scope:
            try:
                if turn.previous is not None:
                    await turn.previous.wait()
                final = await self._transcribe(turn)
            finally:
                await turn.source.aclose()
                turn.finished.set()
            if isinstance(final, Failed) and final.code == ShuttingDown.code:
                await self._going_away(final)
                return
            await turn.committed.wait()
            if final is not None:
                await self._finish(turn, final)

    async def _finish(self, turn: _Turn, final: Done | Failed) -> None:
        if isinstance(final, Failed):
            failed = wire.transcription_failed(
                self._event_id(), turn.item_id, final.code, final.detail, status_of(final.code)
            )
            await self.send(failed)
            return
        text = final.transcript.text
        if delta := wire.next_delta(turn.sent, text):
            await self.send(wire.transcription_delta(self._event_id(), turn.item_id, delta))
        seconds = final.transcript.total_time or turn.ms / 1000
        completed = wire.transcription_completed(self._event_id(), turn.item_id, text, seconds)
        await self.send(completed)
        await self.send(wire.item_done(self._event_id(), turn.item_id, turn.previous_item_id, text))

    async def _transcribe(self, turn: _Turn) -> Done | Failed | None:
        """The turn's job through the pipeline; its final event (None: cancelled first)."""
        settings = turn.settings
        try:
            model = self.state.config.openai.aliases.get(settings.model, settings.model)
            options = JobOptions(
                engine=self.state.engine(model), language=settings.language, use_cache=False
            )
            job = await prepare_job(self.state, turn.source, options, tenant=self.tenant)
        except GatewayError as exc:
            return Failed(exc.code, exc.detail)

        async def consume(outbox: Outbox) -> None:
            while not outbox.finished:
                event = await outbox.get()
                if isinstance(event, Queued):
                    await self.send(wire.queued(self._event_id(), turn.item_id, event.position))
                elif isinstance(event, Progress) and turn.committed.is_set():
                    # Only committed text: a delta is never taken back.
                    text = join_text(event.transcript.committed_segments)
                    if delta := wire.next_delta(turn.sent, text):
                        turn.sent = text
                        await self.send(
                            wire.transcription_delta(self._event_id(), turn.item_id, delta)
                        )

        return await attend(job, consume)


async def realtime(websocket: WebSocket) -> None:
    state: GatewayState = websocket.app.state.gateway
    if websocket.query_params.get("intent") != "transcription":
        refusal = BadRequest(
            "this gateway opens transcription sessions only: connect with ?intent=transcription"
        )
        await websocket.send_denial_response(error_response(refusal))
        return
    if state.draining:
        stopping = ShuttingDown("the gateway is shutting down", retry_after=1)
        await websocket.send_denial_response(error_response(stopping))
        return
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(SUBPROTOCOL if SUBPROTOCOL in offered else None)
    connection = _Connection(websocket, state)
    if "realtime=v1" in websocket.headers.get("openai-beta", "").replace(" ", ""):
        await connection.error(wire.beta_error())
        await websocket.close(BETA_CLOSE, wire.BETA_CODE)
        return
    await connection.run()


def routes() -> list[WebSocketRoute]:
    return [WebSocketRoute(PATH, realtime)]
