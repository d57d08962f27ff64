"""OpenAI Realtime transcription (GA WebSocket protocol) as an engine, losing nothing on reconnect.

The engine seam only: a gateway session is a :class:`~gateway.engines._realtime_client.
RealtimeClient` (the reconnecting client, with its essay on lanes, acknowledgements and
stopping) fed with the pipeline's 16 kHz PCM resampled to 24 kHz, in append frames of at most
``MAX_APPEND_BYTES``, committed every ``MANUAL_COMMIT_BYTES`` when there is no server VAD. This
module never imports the pipeline, the fronts or the store.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from ..admission import Lease
from ..config import OpenAIRealtimeConfig
from ..errors import UpstreamUnavailable
from ..events import EngineUpdate
from ._openai_protocol import BYTES_PER_SECOND, SAMPLE_RATE
from ._realtime_client import RealtimeClient, Totals, open_realtime_client
from ._resample import PcmResampler
from ._upstream import Connector, pool_stats
from .base import PCM_SAMPLE_RATE, Engine, Session, SessionOptions

__all__ = ["MANUAL_COMMIT_BYTES", "MAX_APPEND_BYTES", "OpenAIRealtimeEngine"]

# Largest append frame: 0.5 s of raw PCM, about 32 KB once base64-encoded into JSON.
MAX_APPEND_BYTES: Final = BYTES_PER_SECOND // 2
# Without server VAD nothing commits but us: commit every 20 s of audio so that items (and the
# replay ledger, which only shrinks when items complete) stay bounded. 960 KB of PCM.
MANUAL_COMMIT_BYTES: Final = 20 * BYTES_PER_SECOND


class _RealtimeSession(Session):
    audio_format = "pcm"

    def __init__(self, client: RealtimeClient, *, manual: bool) -> None:
        self._client = client
        self._manual = manual
        self._resampler = PcmResampler(PCM_SAMPLE_RATE, SAMPLE_RATE)
        self._since_commit = 0

    async def _append(self, pcm: bytes) -> None:
        for i in range(0, len(pcm), MAX_APPEND_BYTES):
            await self._client.append(pcm[i : i + MAX_APPEND_BYTES])
        if self._manual:
            self._since_commit += len(pcm)
            if self._since_commit >= MANUAL_COMMIT_BYTES:
                self._since_commit = 0
                self._client.commit()

    async def send_audio(self, chunk: bytes) -> None:
        await self._append(self._resampler.push(chunk))

    async def end_audio(self) -> None:
        await self._append(self._resampler.flush())
        self._client.end()

    async def results(self) -> AsyncIterator[EngineUpdate]:
        async for update in self._client.updates():
            yield update


class OpenAIRealtimeEngine(Engine):
    """OpenAI Realtime transcription, or any server speaking its GA WebSocket protocol."""

    kind = "openai-realtime"
    shares_upstream = True

    def __init__(
        self,
        name: str,
        config: OpenAIRealtimeConfig,
        *,
        connect: Connector | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name, config, sessions={config.url: config.max_sessions})
        self.config = config
        self._connect = connect
        self._rng = rng or random.Random()
        self._totals = Totals()
        self.opened = 0
        self.closed = 0

    def _api_key(self) -> str:
        return os.environ.get(self.config.api_key_env, "")

    @asynccontextmanager
    async def open_session(self, options: SessionOptions, lease: Lease) -> AsyncIterator[Session]:
        api_key = self._api_key()
        if not api_key:
            raise UpstreamUnavailable(
                f"engine {self.name}: environment variable {self.config.api_key_env} is not set"
            )
        self.opened += 1
        try:
            async with open_realtime_client(
                self.config,
                api_key=api_key,
                language=options.language,
                connect=self._connect,
                engine=self.name,
                rng=self._rng,
                totals=self._totals,
                on_ready=lease.succeeded,
            ) as client:
                yield _RealtimeSession(client, manual=self.config.turn_detection == "none")
        except UpstreamUnavailable:
            lease.failed(self.config.backoff_max)
            raise
        finally:
            self.closed += 1

    async def readiness(self) -> str | None:
        if not self._api_key():
            return f"environment variable {self.config.api_key_env} is not set"
        if not self.admission.any_healthy():
            return f"upstream {self.config.url} is backing off after failures"
        return None

    def stats(self) -> dict[str, Any]:
        totals = self._totals
        return {
            **pool_stats(self.admission),
            "reconnects": totals.reconnects,
            "replayed_bytes": totals.replayed_bytes,
            "dropped_chunks": totals.dropped_chunks,
            "dropped_bytes": totals.dropped_bytes,
            "unreplayable_bytes": totals.unreplayable_bytes,
        }
