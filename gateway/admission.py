"""Admission control: per-upstream session caps, one FIFO queue with visible positions, routing.

An :class:`Admission` guards a pool of upstream keys (URLs, or a single key for a one-endpoint
engine), each with a session cap. Admitting is two steps:

- :meth:`Admission.reserve` is synchronous, so the capacity check and the enqueue are one atomic
  step (no other task runs between them): it returns a :class:`Ticket` that holds a :class:`Lease`
  on the healthy key with the fewest sessions, or a place at the back of the FIFO queue, or it
  refuses at once with ``CAPACITY_EXHAUSTED`` when ``max_queue`` tickets already wait. A caller
  that must answer before it commits to a response (an HTTP 503 with Retry-After rather than an
  error event) reserves first and waits later.
- :meth:`Ticket.wait` waits for the grant, reporting the 1-based position whenever it changes
  (positions only ever decrease); a ticket still queued ``queue_timeout`` seconds after it was
  reserved gets ``CAPACITY_TIMEOUT``. :meth:`Ticket.release` (idempotent) gives the place back,
  queued or granted, and a freed slot goes to the head of the queue at once.

``acquire`` is both steps as one async context manager. :meth:`Admission.admit` is ``reserve``
for callers that serve any admission, including the cluster-wide one (:mod:`gateway.cluster`),
whose reservation is a database transaction.

Health: a key whose connection fails is marked unhealthy until a backoff deadline (the caller
picks the backoff; :meth:`Admission.failures` tells how many failures in a row it has had). New
sessions avoid it meanwhile. Once the deadline passes, exactly one session at a time may probe it;
``Lease.succeeded()`` marks it healthy again. A session already running on a key that turned
unhealthy may move to a healthy key with room (``Lease.reroute()``) before it reconnects.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from .errors import CapacityExhausted, CapacityTimeout, UpstreamUnavailable

__all__ = [
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_QUEUE_TIMEOUT",
    "DEFAULT_RETRY_AFTER",
    "RENUMBER_DELAY",
    "UNLIMITED",
    "Admission",
    "Lease",
    "Ticket",
]

# Seconds a refused client is told to wait (Retry-After) when nothing better is known.
DEFAULT_RETRY_AFTER = 5.0
# Departures from the queue within this many seconds share one renumbering (see _renumber_soon).
RENUMBER_DELAY = 0.05
# The session cap of a key with no cap: every reservation is granted at once.
UNLIMITED = sys.maxsize
# Queue limits for an engine whose configuration does not set them.
DEFAULT_MAX_QUEUE = 256
DEFAULT_QUEUE_TIMEOUT = 600.0


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
class Lease:
    """The right to run one session on ``key`` (which ``reroute`` may change).

    A shared admission (:mod:`gateway.cluster`) may revoke a lease it can no longer vouch for;
    the session holding it must then end (:meth:`wait_revoked`). A local lease is never revoked.
    """

    key: str
    _admission: Admission
    _upstream: _Upstream
    _revoked: anyio.Event = field(default_factory=anyio.Event)
    _revoked_because: str = ""

    def revoke(self, reason: str) -> None:
        """Withdraw the right: whoever waits in :meth:`wait_revoked` learns ``reason``."""
        if not self._revoked.is_set():
            self._revoked_because = reason
            self._revoked.set()

    async def wait_revoked(self) -> str:
        """Wait until the lease is revoked (for ever, for a local one); the reason."""
        await self._revoked.wait()
        return self._revoked_because

    def failed(self, backoff: float) -> None:
        """This lease's key failed to connect: avoid it for ``backoff`` seconds."""
        self._admission.mark_unhealthy(self.key, backoff)

    def succeeded(self) -> None:
        """This lease's key connected: it is healthy."""
        self._admission.mark_healthy(self.key)

    def reroute(self) -> bool:
        """Move to a healthy key with room if the current one is unhealthy; True if it moved."""
        return self._admission._reroute(self)


@dataclass(eq=False)
class Ticket:
    """A place taken by :meth:`Admission.reserve`: a lease at once, or a place in the queue."""

    _admission: Admission
    #: When a ticket still queued gives up (CAPACITY_TIMEOUT).
    deadline: float
    #: Set once granted (at reservation, or when a slot frees up).
    lease: Lease | None = None
    #: The 1-based place in the queue while queued; 0 once granted or released.
    position: int = 0
    _report: Callable[[int], None] | None = None
    _granted: anyio.Event = field(default_factory=anyio.Event)
    _released: bool = False

    def _grant(self, lease: Lease) -> None:
        self.lease, self.position = lease, 0
        self._granted.set()

    def _moved(self, position: int) -> None:
        self.position = position
        if self._report is not None:
            self._report(position)

    async def wait(self, report: Callable[[int], None] | None = None) -> Lease:
        """The lease, once granted; meanwhile ``report`` gets the queue position now and at
        every change.

        Raises:
            CapacityTimeout: still queued at the deadline (the ticket is then released).
        """
        if self._released:
            raise RuntimeError("this ticket was released")
        admission = self._admission
        if self.lease is None:
            self._report = report
            if report is not None:
                report(self.position)
            with anyio.move_on_at(self.deadline):
                while self.lease is None:
                    # Sleep until granted, or until a backed-off upstream may be probed.
                    with anyio.move_on_after(admission._next_retry()):
                        await self._granted.wait()
                    if self.lease is None:
                        admission._dispatch()
            if self.lease is None:
                self._released = True
                admission._waiters.remove(self)
                self.position = 0
                admission._dispatch()  # its client waits for CAPACITY_TIMEOUT: no delay
                raise CapacityTimeout(f"still queued after {admission.queue_timeout:g} s")
        return self.lease

    async def release(self) -> None:
        """Give the place back: a lease goes to the head of the queue at once, a queued place
        is left at once (those behind move up within RENUMBER_DELAY). Idempotent; safe when
        cancelled."""
        if self._released:
            return
        self._released = True
        self._report = None
        admission = self._admission
        if self.lease is not None:
            admission._release(self.lease)
            return
        admission._waiters.remove(self)
        self.position = 0
        await admission._renumber_soon()

    @asynccontextmanager
    async def granted(self, report: Callable[[int], None] | None = None) -> AsyncIterator[Lease]:
        """:meth:`wait` for the lease, hold it for the block, then :meth:`release` the ticket
        (also when the wait fails or is cancelled)."""
        try:
            yield await self.wait(report)
        finally:
            await self.release()


class Admission:
    def __init__(
        self,
        capacities: Mapping[str, int],
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
    ) -> None:
        if not capacities:
            raise ValueError("an admission pool needs at least one upstream")
        self._upstreams = {k: _Upstream(k, c) for k, c in capacities.items()}
        self._waiters: deque[Ticket] = deque()
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

    @property
    def capacity(self) -> int:
        """Sessions that may run at once, over every upstream key."""
        return sum(u.capacity for u in self._upstreams.values())

    @property
    def capacities(self) -> dict[str, int]:
        """The session cap of each upstream key."""
        return {k: u.capacity for k, u in self._upstreams.items()}

    def shared_figures(self) -> dict[str, int]:
        """Figures of the admission shared with other replicas (none for a local one)."""
        return {}

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
            self._waiters.popleft()._grant(self._take(u))
        for i, ticket in enumerate(self._waiters, start=1):
            if ticket.position != i:
                ticket._moved(i)

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

    def reserve(self) -> Ticket:
        """Take a place now: a lease if a slot is free and nobody waits, else the back of the
        queue. Synchronous, so no other task can take the place between the check and the
        enqueue.

        Raises:
            CapacityExhausted: ``max_queue`` tickets are already waiting.
        """
        ticket = Ticket(self, anyio.current_time() + self.queue_timeout)
        upstream = self._pick() if not self._waiters else None
        if upstream is not None:
            ticket._grant(self._take(upstream))
            return ticket
        if len(self._waiters) >= self.max_queue:
            raise CapacityExhausted(
                f"{len(self._waiters)} requests already queued", retry_after=DEFAULT_RETRY_AFTER
            )
        self._waiters.append(ticket)
        ticket.position = len(self._waiters)
        return ticket

    async def admit(self) -> Ticket:
        """:meth:`reserve`, for callers that serve any admission: a shared one
        (:class:`gateway.cluster.ClusterAdmission`) asks its database here. This one has no
        checkpoint, so it stays one atomic step."""
        return self.reserve()

    @asynccontextmanager
    async def acquire(self, on_queued: Callable[[int], None] | None = None) -> AsyncIterator[Lease]:
        """Admit and wait: hold one session slot for the duration of the block.

        Raises:
            CapacityExhausted: ``max_queue`` requests are already waiting.
            CapacityTimeout: still queued after ``queue_timeout`` seconds.
        """
        async with (await self.admit()).granted(on_queued) as lease:
            yield lease
