"""Admission control: per-upstream session caps, one FIFO queue with visible positions, routing.

An :class:`Admission` guards a pool of upstream keys (URLs), each with a session cap. ``acquire``
grants a lease on the healthy key with the fewest sessions, or queues the caller FIFO and reports
its 1-based position whenever it changes. Past ``max_queue`` waiters it refuses at once with
``CAPACITY_EXHAUSTED``; a caller still queued after ``queue_timeout`` gets ``CAPACITY_TIMEOUT``.

A key that fails is marked unhealthy until a backoff deadline, after which one probe session may
use it again; success marks it healthy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from .errors import CapacityExhausted, CapacityTimeout, UpstreamUnavailable

__all__ = ["Admission", "Lease"]


@dataclass(eq=False)
class _Upstream:
    key: str
    capacity: int
    sessions: int = 0
    healthy: bool = True
    failures: int = 0
    retry_at: float = 0.0
    probing: bool = False

    def usable(self, now: float) -> bool:
        if self.sessions >= self.capacity:
            return False
        if self.healthy:
            return True
        # One probe at a time once the backoff deadline has passed.
        return now >= self.retry_at and not self.probing


@dataclass(eq=False)
class _Waiter:
    on_queued: Callable[[int], None] | None
    granted: anyio.Event = field(default_factory=anyio.Event)
    upstream: _Upstream | None = None
    position: int = 0


@dataclass(eq=False)
class Lease:
    """The right to run one session on ``key``. Report failure with ``failed()``."""

    key: str
    _admission: Admission
    _upstream: _Upstream

    def failed(self, backoff: float) -> None:
        self._admission.mark_unhealthy(self.key, backoff)

    def succeeded(self) -> None:
        self._admission.mark_healthy(self.key)


class Admission:
    def __init__(
        self,
        capacities: dict[str, int],
        *,
        max_queue: int,
        queue_timeout: float,
    ) -> None:
        if not capacities:
            raise ValueError("an admission pool needs at least one upstream")
        self._upstreams = {k: _Upstream(k, c) for k, c in capacities.items()}
        self._waiters: deque[_Waiter] = deque()
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.peak_sessions = 0

    # -- figures ---------------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self._waiters)

    @property
    def active(self) -> int:
        return sum(u.sessions for u in self._upstreams.values())

    def sessions(self) -> dict[str, int]:
        return {k: u.sessions for k, u in self._upstreams.items()}

    def health(self) -> dict[str, bool]:
        return {k: u.healthy for k, u in self._upstreams.items()}

    def any_healthy(self) -> bool:
        now = anyio.current_time()
        return any(u.healthy or now >= u.retry_at for u in self._upstreams.values())

    # -- health ----------------------------------------------------------------------------
    def mark_unhealthy(self, key: str, backoff: float) -> None:
        u = self._upstreams[key]
        u.healthy = False
        u.failures += 1
        u.retry_at = anyio.current_time() + backoff

    def mark_healthy(self, key: str) -> None:
        u = self._upstreams[key]
        u.healthy = True
        u.failures = 0
        self._dispatch()

    # -- leasing ---------------------------------------------------------------------------
    def _pick(self) -> _Upstream | None:
        now = anyio.current_time()
        usable = [u for u in self._upstreams.values() if u.usable(now)]
        if not usable:
            return None
        # Healthy first, then the fewest sessions; dict order breaks ties deterministically.
        return min(usable, key=lambda u: (not u.healthy, u.sessions))

    def _take(self, u: _Upstream) -> None:
        u.sessions += 1
        if not u.healthy:
            u.probing = True
        self.peak_sessions = max(self.peak_sessions, self.active)

    def _dispatch(self) -> None:
        while self._waiters:
            u = self._pick()
            if u is None:
                break
            w = self._waiters.popleft()
            self._take(u)
            w.upstream = u
            w.granted.set()
        for i, w in enumerate(self._waiters, start=1):
            if w.position != i:
                w.position = i
                if w.on_queued is not None:
                    w.on_queued(i)

    def _release(self, u: _Upstream) -> None:
        u.sessions -= 1
        u.probing = False
        self._dispatch()

    def _next_retry(self) -> float:
        now = anyio.current_time()
        pending = [u.retry_at - now for u in self._upstreams.values() if not u.healthy]
        return max(min(pending), 0.01) if pending else float("inf")

    @asynccontextmanager
    async def acquire(
        self, on_queued: Callable[[int], None] | None = None
    ) -> AsyncIterator[Lease]:
        upstream = self._pick() if not self._waiters else None
        if upstream is not None:
            self._take(upstream)
        else:
            if len(self._waiters) >= self.max_queue:
                raise CapacityExhausted(
                    f"{len(self._waiters)} requests already queued", retry_after=5.0
                )
            waiter = _Waiter(on_queued)
            self._waiters.append(waiter)
            waiter.position = len(self._waiters)
            if on_queued is not None:
                on_queued(waiter.position)
            try:
                with anyio.fail_after(self.queue_timeout):
                    while not waiter.granted.is_set():
                        # Wake up when a backed-off upstream becomes probeable again.
                        with anyio.move_on_after(self._next_retry()):
                            await waiter.granted.wait()
                        if not waiter.granted.is_set():
                            self._dispatch()
            except BaseException as exc:
                if waiter.upstream is None:
                    self._waiters.remove(waiter)
                    self._dispatch()
                else:
                    # Granted, but cancelled before we could use it: hand the slot on.
                    self._release(waiter.upstream)
                if isinstance(exc, TimeoutError):
                    raise CapacityTimeout(f"still queued after {self.queue_timeout:g} s") from None
                raise
            upstream = waiter.upstream
            assert upstream is not None
        try:
            yield Lease(upstream.key, self, upstream)
        finally:
            self._release(upstream)

    def unavailable(self) -> UpstreamUnavailable:
        return UpstreamUnavailable("no healthy upstream: " + ", ".join(self._upstreams))

    def check(self) -> None:
        """Refuse up front (CAPACITY_EXHAUSTED) when ``acquire`` would find the queue full."""
        if len(self._waiters) >= self.max_queue and (self._waiters or self._pick() is None):
            raise CapacityExhausted(
                f"{len(self._waiters)} requests already queued", retry_after=5.0
            )
