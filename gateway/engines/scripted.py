"""A deterministic engine that replays a fixed script of words against the audio it receives.

It exists for demos, tests and benchmarks that need a real engine with known output and no model:
word *i* of the script covers audio ``[i, i+1) * seconds_per_word`` and is committed once that much
audio has arrived; the last word still growing is shown as a tentative segment. ``delay`` makes it
slow, ``fail_after`` makes it fail with ``UPSTREAM_ERROR``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from ..admission import Lease
from ..config import ScriptedConfig
from ..errors import UpstreamError
from ..events import EngineUpdate, Segment
from .base import PCM_BYTES_PER_SECOND, Engine, Session, SessionOptions

__all__ = ["ScriptedEngine"]

# Updates waiting for the pipeline's receiver; each is a few hundred bytes, so a stream holds < 8 KiB.
RESULTS_CAPACITY = 16


class _ScriptedSession(Session):
    def __init__(self, engine: ScriptedEngine) -> None:
        self._engine = engine
        self._cfg = engine.config
        self._received = 0
        self._updates = 0
        self._committed: tuple[Segment, ...] = ()
        self._send, self._recv = anyio.create_memory_object_stream[EngineUpdate | Exception](
            RESULTS_CAPACITY
        )

    def _update(self, final: bool) -> EngineUpdate:
        spw = self._cfg.seconds_per_word
        seconds = self._received / PCM_BYTES_PER_SECOND
        words = self._cfg.words
        # Complete words are committed; at the end a partly heard word counts as complete.
        heard = -(-seconds // spw) if final else seconds // spw
        done = min(len(words), int(heard))
        # Committed segments only grow: extend the kept tuple (reused, as engines do) instead of
        # rebuilding it, so the fake engine costs O(new words) per update, not O(transcript).
        if done > len(self._committed):
            added = range(len(self._committed), done)
            self._committed += tuple(Segment(i * spw, (i + 1) * spw, words[i]) for i in added)
        committed = self._committed
        tentative: tuple[Segment, ...] = ()
        if not final and done < len(words) and seconds > done * spw:
            tentative = (Segment(done * spw, seconds, words[done]),)
        return EngineUpdate(committed=committed, tentative=tentative, processed=seconds)

    async def _emit(self, final: bool) -> None:
        if self._cfg.delay:
            await anyio.sleep(self._cfg.delay)
        self._updates += 1
        if 0 <= self._cfg.fail_after < self._updates:
            await self._send.send(UpstreamError("scripted failure"))
            return
        await self._send.send(self._update(final))

    async def send_audio(self, chunk: bytes) -> None:
        before = int(self._received / PCM_BYTES_PER_SECOND / self._cfg.seconds_per_word)
        self._received += len(chunk)
        after = int(self._received / PCM_BYTES_PER_SECOND / self._cfg.seconds_per_word)
        if after != before:
            await self._emit(final=False)

    async def end_audio(self) -> None:
        await self._emit(final=True)
        await self._send.aclose()

    async def results(self) -> AsyncIterator[EngineUpdate]:
        async for item in self._recv:
            if isinstance(item, Exception):
                raise item
            yield item

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._recv.aclose()


class ScriptedEngine(Engine):
    kind = "scripted"
    # A stand-in for an upstream server in demos, tests and benchmarks.
    shares_upstream = True

    def __init__(self, name: str, config: ScriptedConfig) -> None:
        super().__init__(name, config, sessions=config.max_sessions)
        self.config = config
        self.active = 0
        self.opened = 0
        self.closed = 0
        self._changed = anyio.Event()

    async def wait_closed(self, count: int) -> None:
        """Wait until ``count`` sessions have been closed (for tests and benchmarks)."""
        while self.closed < count:
            await self._changed.wait()

    async def wait_opened(self, count: int) -> None:
        """Wait until ``count`` sessions have been opened (for tests and benchmarks)."""
        while self.opened < count:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    @asynccontextmanager
    async def open_session(self, options: SessionOptions, lease: Lease) -> AsyncIterator[Session]:
        session = _ScriptedSession(self)
        self.active += 1
        self.opened += 1
        self._notify()
        try:
            yield session
        finally:
            self.active -= 1
            self.closed += 1
            self._notify()
            with anyio.CancelScope(shield=True):
                await session.aclose()

    def stats(self) -> dict[str, int]:
        return {"sessions": self.active, "opened": self.opened, "closed": self.closed}
