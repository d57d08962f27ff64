"""A job's life below the front APIs: the gateway's running state, and turning a request's
options and audio into a prepared :class:`~gateway.pipeline.Job`.

Everything a job needs settled before its stream starts lives here, in one place and in one
order: the drain check, the tenant's stream limit, the engine's language, the cache lookup, the
reservation of a place at the engine's admission, readiness and the audio probe. Each failure is
a coded :class:`~gateway.errors.GatewayError` the front answers in its own shape, before any
byte of the stream.

The arrows point one way: front APIs -> jobs -> pipeline -> engines, store and sources. This
module must never import a front API (``gateway.api``), the app or the auth middleware.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from .admission import Ticket
from .cluster import Cluster
from .config import Config
from .engines import Engine
from .errors import GatewayError, ShuttingDown, TooManyStreams, UnknownEngine, UpstreamUnavailable
from .events import Done
from .logs import current_request
from .pipeline import Job, StopSignal
from .sources import AudioSource
from .store import Store, StoredTranscript

__all__ = [
    "RETRY_AFTER_SECONDS",
    "GatewayState",
    "JobOptions",
    "TenantStreams",
    "cached_result",
    "prepare_job",
]

# A client over its tenant's stream limit is told to retry after this many seconds.
RETRY_AFTER_SECONDS = 5.0


class TenantStreams:
    """Concurrent transcriptions per tenant; ``limit`` 0 means unlimited."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active: dict[str, int] = {}

    def acquire(self, tenant: str) -> Callable[[], None]:
        """Take a slot or raise :class:`TooManyStreams`; returns the release, safe to call twice."""
        count = self.active.get(tenant, 0)
        if self.limit and count >= self.limit:
            raise TooManyStreams(
                f"tenant has {count} streams running, the limit is {self.limit}",
                retry_after=RETRY_AFTER_SECONDS,
            )
        self.active[tenant] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.active[tenant] - 1
            if left:
                self.active[tenant] = left
            else:
                del self.active[tenant]

        return release


@dataclass(eq=False)
class GatewayState:
    """What the app holds while it runs: the store, the engines and the drain state.

    Shutdown is two steps (see :func:`gateway.server.serve`): :meth:`drain` makes /readyz fail and
    refuses new jobs while in-flight ones continue; :meth:`stop_jobs` then ends those still running
    with SHUTTING_DOWN.
    """

    config: Config
    store: Store
    engines: dict[str, Engine] = field(default_factory=dict)
    # Cluster-wide admission, on PostgreSQL (None: each engine admits on its own).
    cluster: Cluster | None = None
    draining: bool = False
    stop: StopSignal = field(default_factory=StopSignal)
    active_jobs: int = 0
    _idle: anyio.Event = field(default_factory=anyio.Event)
    # Concurrent streams per tenant (auth.max_streams_per_tenant).
    tenant_streams: TenantStreams = field(init=False)

    def __post_init__(self) -> None:
        self.tenant_streams = TenantStreams(self.config.auth.max_streams_per_tenant)

    def drain(self) -> None:
        self.draining = True

    def stop_jobs(self) -> None:
        self.stop.set()

    def job_started(self) -> None:
        if self.active_jobs == 0:
            self._idle = anyio.Event()
        self.active_jobs += 1

    def job_ended(self) -> None:
        self.active_jobs -= 1
        if self.active_jobs == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        if self.active_jobs:
            await self._idle.wait()

    def engine(self, name: str) -> Engine:
        """The engine called ``name`` ("" for the default): the one lookup of an engine name."""
        try:
            return self.engines[name or self.config.server.default_engine]
        except KeyError:
            configured = ", ".join(self.engines)
            raise UnknownEngine(f"unknown engine {name!r}; configured: {configured}") from None


@dataclass(frozen=True, kw_only=True)
class JobOptions:
    """What a front API reads from a request to set up a job (fronts may add their own)."""

    engine: Engine
    language: str = ""
    use_cache: bool = True


def cached_result(stored: StoredTranscript | None, engine: str, language: str) -> Done | None:
    """The ``done`` a stored transcript answers a request with, or None if it may not.

    A human-corrected transcript is served whatever engine made it; a machine one only to requests
    for the same engine and language, and never when it is empty.
    """
    if stored is None:
        return None
    if stored.corrected is None and (stored.engine != engine or stored.language != language):
        return None
    cached = stored.transcript(corrections=True)
    if not cached.text:
        return None
    return Done(cached, cached=True, corrected=stored.corrected is not None)


async def prepare_job(
    state: GatewayState, source: AudioSource, options: JobOptions, *, tenant: str = ""
) -> Job:
    """Settle everything the job needs before its stream starts; the source is closed on failure.

    The tenant's slot comes first, then the cache: a cache hit needs no engine session, so it is
    served even when the engine is at capacity or unreachable, and without opening the audio. On
    a miss the job reserves its place at the engine's admission in one atomic step (see
    :meth:`~gateway.admission.Admission.admit`): it either holds a place (running or queued)
    before its 200, or is refused with 503 CAPACITY_EXHAUSTED and Retry-After, whatever the
    engine. Readiness and the audio probe come last, as they cost the most.
    """
    entry = current_request()
    engine = options.engine
    release: Callable[[], None] | None = None
    ticket: Ticket | None = None
    cached: Done | None = None
    try:
        if state.draining:
            raise ShuttingDown("the gateway is shutting down", retry_after=1)
        release = state.tenant_streams.acquire(tenant)
        language = engine.resolve_language(options.language)
        if options.use_cache:
            stored = await state.store.get(source.id, tenant)
            cached = cached_result(stored, engine.name, language)
        if cached is None:
            ticket = await engine.admission.admit()
            reason = await engine.readiness()
            if reason is not None:
                raise UpstreamUnavailable(reason)
            await source.open()
    except BaseException as exc:
        if release is not None:
            release()
        if entry is not None and isinstance(exc, GatewayError):
            entry.outcome = exc.code
        if ticket is not None:
            await ticket.release()
        await source.aclose()
        raise
    total_time = cached.transcript.total_time if cached is not None else source.duration
    state.job_started()
    if entry is not None:
        entry.engine, entry.audio_seconds = engine.name, total_time
    return Job(
        source=source,
        cached=cached,
        ticket=ticket,
        engine=engine,
        store=state.store,
        language=language,
        tenant=tenant,
        total_time=total_time,
        max_seconds=state.config.server.max_session_seconds,
        stop=state.stop,
        on_close=[state.job_ended, release],
        on_outcome=entry.set_outcome if entry is not None else None,
    )
