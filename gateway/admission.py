"""Admission control: per-upstream session caps, one FIFO queue with visible positions, routing.

An :class:`Admission` guards a pool of upstream keys (URLs, or a single key for a one-endpoint
engine), each with a session cap. ``acquire`` grants a :class:`Lease` on the healthy key with the
fewest sessions, or queues the caller FIFO and reports its 1-based position whenever it changes
(positions only ever decrease). Past ``max_queue`` waiters it refuses at once with
``CAPACITY_EXHAUSTED``; a caller still queued after ``queue_timeout`` gets ``CAPACITY_TIMEOUT``.
Leaving the ``acquire`` block, normally, by error or by cancellation, frees the slot at once and
hands it to the head of the queue.

Health: a key whose connection fails is marked unhealthy until a backoff deadline (the caller
picks the backoff; :meth:`Admission.failures` tells how many failures in a row it has had). New
sessions avoid it meanwhile. Once the deadline passes, exactly one session at a time may probe it;
``Lease.succeeded()`` marks it healthy again. A session already running on a key that turned
unhealthy may move to a healthy key with room (``Lease.reroute()``) before it reconnects.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from .errors import CapacityExhausted, CapacityTimeout, UpstreamUnavailable

__all__ = ["DEFAULT_RETRY_AFTER", "RENUMBER_DELAY", "Admission", "Lease"]

# Seconds a refused client is told to wait (Retry-After) when nothing better is known.
DEFAULT_RETRY_AFTER = 5.0
# Departures from the queue within this many seconds share one renumbering (see _renumber_soon).
RENUMBER_DELAY = 0.05


@dataclass(eq=False)
class _Upstream:
    key: str
    capacity: int
    sessions: int = 0
    healthy: bool = True
    failures: int = 0
    retry_at: float = 0.0
    # The lease currently probing this (unhealthy) upstream, if any.
    probe: Lease | None = None

    def usable(self, now: float) -> bool:
        if self.sessions >= self.capacity:
            return False
        if self.healthy:
            return True
        return now >= self.retry_at and self.probe is None


@dataclass(eq=False)
class _Waiter:
    on_queued: Callable[[int], None] | None
    granted: anyio.Event = field(default_factory=anyio.Event)
    lease: Lease | None = None
    position: int = 0


@dataclass(eq=False)
class Lease:
    """The right to run one session on ``key`` (which ``reroute`` may change)."""

    key: str
    _admission: Admission
    _upstream: _Upstream

    def failed(self, backoff: float) -> None:
        """This lease's key failed to connect: avoid it for ``backoff`` seconds."""
        self._admission.mark_unhealthy(self.key, backoff)

    def succeeded(self) -> None:
        """This lease's key connected: it is healthy."""
        self._admission.mark_healthy(self.key)

    def reroute(self) -> bool:
        """Move to a healthy key with room if the current one is unhealthy; True if it moved."""
        return self._admission._reroute(self)


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
        self._renumber_pending = False
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        #: Most sessions ever held at once, over the whole pool.
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

    def failures(self, key: str) -> int:
        """Connection failures in a row on ``key`` (0 once it succeeds)."""
        return self._upstreams[key].failures

    def any_healthy(self) -> bool:
        now = anyio.current_time()
        return any(u.healthy or now >= u.retry_at for u in self._upstreams.values())

    def unavailable(self) -> UpstreamUnavailable:
        return UpstreamUnavailable("no healthy upstream: " + ", ".join(self._upstreams))

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
    def _pick(self, exclude: _Upstream | None = None) -> _Upstream | None:
        now = anyio.current_time()
        usable = [u for u in self._upstreams.values() if u is not exclude and u.usable(now)]
        if not usable:
            return None
        # Healthy first, then the fewest sessions; dict order breaks ties deterministically.
        return min(usable, key=lambda u: (not u.healthy, u.sessions))

    def _take(self, u: _Upstream) -> Lease:
        lease = Lease(u.key, self, u)
        u.sessions += 1
        if not u.healthy:
            u.probe = lease
        self.peak_sessions = max(self.peak_sessions, self.active)
        return lease

    def _dispatch(self) -> None:
        while self._waiters:
            u = self._pick()
            if u is None:
                break
            w = self._waiters.popleft()
            w.lease = self._take(u)
            w.granted.set()
        for i, w in enumerate(self._waiters, start=1):
            if w.position != i:
                w.position = i
                if w.on_queued is not None:
                    w.on_queued(i)

    def _release(self, lease: Lease) -> None:
        u = lease._upstream
        u.sessions -= 1
        if u.probe is lease:
            u.probe = None
        self._dispatch()

    def _reroute(self, lease: Lease) -> bool:
        current = lease._upstream
        if current.healthy:
            return False
        target = self._pick(exclude=current)
        if target is None or not target.healthy:
            return False
        current.sessions -= 1
        if current.probe is lease:
            current.probe = None
        target.sessions += 1
        lease.key, lease._upstream = target.key, target
        self._dispatch()
        return True

    def _next_retry(self) -> float:
        """Seconds until an unhealthy upstream becomes probeable (inf: nothing to wait for).

        Upstreams being probed are left out: their probe's release or success dispatches."""
        now = anyio.current_time()
        pending = [
            u.retry_at - now
            for u in self._upstreams.values()
            if not u.healthy and u.probe is None and u.sessions < u.capacity
        ]
        return max(min(pending), 0.0) if pending else math.inf

    async def _renumber_soon(self) -> None:
        """Renumber the queue after a departure, once per RENUMBER_DELAY for all departures.

        A departure frees no slot, so it only moves the waiters behind it up. Renumbering at
        once would cost O(queue) per departure: 5,000 queued clients leaving together made 6
        million position updates and kept the event loop busy for seconds. The first cancelled
        waiter waits RENUMBER_DELAY (shielded: nobody waits for it any more) and renumbers for
        every departure meanwhile.
        """
        if self._renumber_pending:
            return
        self._renumber_pending = True
        try:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(RENUMBER_DELAY)
        finally:
            self._renumber_pending = False
            self._dispatch()

    def check(self) -> None:
        """Refuse up front (CAPACITY_EXHAUSTED) when ``acquire`` would find the queue full.

        For callers that must answer before committing to a response (an HTTP 503 with
        Retry-After rather than an error event). ``acquire`` applies the same rule.
        """
        if len(self._waiters) >= self.max_queue and (self._waiters or self._pick() is None):
            raise CapacityExhausted(
                f"{len(self._waiters)} requests already queued", retry_after=DEFAULT_RETRY_AFTER
            )

    @asynccontextmanager
    async def acquire(self, on_queued: Callable[[int], None] | None = None) -> AsyncIterator[Lease]:
        """Hold one session slot for the duration of the block.

        Raises:
            CapacityExhausted: ``max_queue`` requests are already waiting.
            CapacityTimeout: still queued after ``queue_timeout`` seconds.
        """
        upstream = self._pick() if not self._waiters else None
        if upstream is not None:
            lease = self._take(upstream)
        else:
            self.check()
            waiter = _Waiter(on_queued)
            self._waiters.append(waiter)
            waiter.position = len(self._waiters)
            if on_queued is not None:
                on_queued(waiter.position)
            try:
                with anyio.fail_after(self.queue_timeout):
                    while not waiter.granted.is_set():
                        # Sleep until granted, or until a backed-off upstream may be probed.
                        with anyio.move_on_after(self._next_retry()):
                            await waiter.granted.wait()
                        if not waiter.granted.is_set():
                            self._dispatch()
            except BaseException as exc:
                if waiter.lease is None:
                    self._waiters.remove(waiter)
                    if isinstance(exc, TimeoutError):
                        self._dispatch()  # its client waits for CAPACITY_TIMEOUT: no delay
                    else:
                        await self._renumber_soon()
                else:
                    # Granted, but cancelled before we could use it: hand the slot on.
                    self._release(waiter.lease)
                if isinstance(exc, TimeoutError):
                    raise CapacityTimeout(f"still queued after {self.queue_timeout:g} s") from exc
                raise
            assert waiter.lease is not None
            lease = waiter.lease
        try:
            yield lease
        finally:
            self._release(lease)
