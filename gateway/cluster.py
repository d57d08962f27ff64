"""Cluster-wide admission: several replicas share each engine's session caps and one FIFO queue
through the PostgreSQL database they already share for transcripts.

What lives here: :class:`Cluster` (this replica's membership: registration, heartbeats, the
wake-up listener, and the one loop that talks to the database), :class:`ClusterAdmission` (an
:class:`~gateway.admission.Admission` whose places are rows in that database) and
:func:`open_cluster`. It imports the admission module, the errors and psycopg; never the store,
the pipeline, the engines or the fronts.

The mechanism, and why
----------------------
Two tables (created by the store's migration 3): ``gateway_replicas`` (one row per live replica,
with ``heartbeat_at``) and ``gateway_tickets`` (one row per place, queued or running: ``seq`` from
one sequence is the FIFO order across replicas; ``upstream`` is NULL while queued and names the
upstream key once granted; ``ON DELETE CASCADE`` from its replica).

- **One pool, one lock.** A cap is a count over every replica's rows, so the check and the
  insert must not interleave with another replica's. Each transaction that reserves or grants
  in a pool first takes ``pg_advisory_xact_lock`` on the pool's name, held to its commit. A
  leases table with ``FOR UPDATE SKIP LOCKED`` suits workers claiming separate jobs, not a count
  that must stay under a cap; advisory locks held by sessions die with the connection, so a
  database restart or a reconnect would look like every replica dying at once. The pool lock is
  held for a few statements, a millisecond or two (``bench/cluster.py`` measures it).
- **Only the owner grants.** A queued row is granted by the replica that holds its client, in
  ``seq`` order: when the head of the queue belongs to another replica, nothing behind it is
  granted, and that replica is woken. So grants never wait on a replica that cannot see them,
  and the queue stays one FIFO whichever replica a client reached.
- **Wake-ups by LISTEN/NOTIFY, truth by polling.** A replica that frees a place or finds the
  head of the queue belongs to another sends ``NOTIFY gateway_admission``; every replica
  listens on a dedicated connection and re-checks at once. Notifications can be lost (a
  listener reconnecting), so every replica also re-checks every ``cluster.heartbeat`` seconds.
- **Heartbeats bound a dead replica's leak.** Each check also sets this replica's
  ``heartbeat_at``. Any replica deletes replicas whose heartbeat is older than
  ``cluster.lease_ttl`` (the database's clock: no skew between replicas), and their places go
  with them. So a replica killed with SIGKILL, or cut off from the database, frees its capacity
  within ``lease_ttl`` plus one heartbeat. Liveness by the database's view of a connection
  (session advisory locks, ``pg_stat_activity``) would be quicker after a SIGKILL, but reads
  the same after a database restart as after a death, and a network split hides a dead peer
  for as long as TCP keepalives allow; one TTL gives one bound for all three.
- **Every call has a deadline, and may be left running.** A connection whose peer went
  silent can hang past any socket timeout, so each database call is abandoned after
  ``_CALL_TIMEOUT`` (or when its caller leaves) while its thread finishes alone. A check whose
  answer was lost may have granted places: the next good check reports every grant this
  replica holds, so nothing is lost. A reservation carries a random token (migration 4), and one whose answer was
  lost has its row deleted by the next good check once its thread has ended: a commit whose
  answer never arrived does not keep a place for ever.
- **Losing the database stops admission, then ends sessions.** After one failed check a
  replica admits nothing new (503 UPSTREAM_UNAVAILABLE, and ``/readyz`` names the reason). If
  it still cannot check ``lease_ttl - heartbeat`` seconds after its last good check, the others
  may soon take its places: it revokes its leases (the sessions end with UPSTREAM_UNAVAILABLE,
  nothing is stored) and fails its queued tickets, so no upstream ever gets more sessions than
  its cap. A database restart shorter than that costs nothing: the rows are durable.

Which engines share their admission: those whose sessions run on servers every replica uses
(``Engine.shares_upstream``: WhisperLiveKit, OpenAI Realtime, and the scripted stand-in) and
that have a cap. An embedded engine's cap is its own replica's cores, and a client can only run
on the replica it reached, so it keeps a local admission; an uncapped engine never queues.

Upstream health stays each replica's own view (a connection failure seen by one replica is not
shared), and a cluster lease is never rerouted to another key while it runs: the session
reconnects to its own key after a backoff instead.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
import psycopg

from . import _pg
from .admission import DEFAULT_RETRY_AFTER, Admission, Lease, Ticket
from .config import ClusterConfig
from .errors import CapacityExhausted, CapacityTimeout, UpstreamUnavailable
from .metrics import CLUSTER_QUEUE_LENGTH, CLUSTER_SESSIONS

__all__ = ["Cluster", "ClusterAdmission", "open_cluster"]

log = logging.getLogger("gateway.cluster")

T = TypeVar("T")

# NOTIFY channel every replica listens on.
CHANNEL = "gateway_admission"
# First key of the two-key advisory locks on pools ("ga"), so they cannot collide with an
# application's one-key locks on the same database.
_LOCK_CLASS = 0x6761
# Connections this replica's admission keeps for its transactions (the listener has its own).
_POOL_SIZE = 2
# Seconds a database call may take before it counts as a failure (connect, wait for the pool
# lock, or a statement).
_DB_TIMEOUT = 5.0
# Seconds a whole call may take (a connection from the pool, then its statements).
_CALL_TIMEOUT = 2 * _DB_TIMEOUT
# Seconds the listener thread blocks for notifications before it checks whether to stop.
_LISTEN_POLL = 0.5


def _name(replica: str) -> str:
    return f"gateway-admission-{replica}"


def _connect_options(replica: str) -> dict[str, Any]:
    # A silent peer is given up after _DB_TIMEOUT: this replica's checks, not its clients, wait.
    return _pg.connect_options(
        max_wait=_DB_TIMEOUT,
        dead_after=_DB_TIMEOUT,
        statement_timeout=_DB_TIMEOUT,
        name=_name(replica),
    )


class _Expired(Exception):
    """This replica's row is gone: the others took its places after lease_ttl."""


@dataclass(frozen=True)
class _Offer:
    """An upstream key this replica would grant on, with its cap and local health."""

    key: str
    capacity: int
    healthy: bool


def _pick(offers: Sequence[_Offer], counts: dict[str, int]) -> str | None:
    # Healthy first, then the fewest sessions cluster-wide; the offers' order breaks ties.
    room = [o for o in offers if counts.get(o.key, 0) < o.capacity]
    if not room:
        return None
    return min(room, key=lambda o: (not o.healthy, counts.get(o.key, 0))).key


@dataclass
class _PoolState:
    """What one check learned about a pool, for this replica's tickets."""

    granted: list[tuple[int, str]] = field(default_factory=list)
    # Every grant the replica holds, when the check reconciled (see _dispatch_sql).
    held: list[tuple[int, str]] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)
    sessions: int = 0
    queued: int = 0
    notify: bool = False


def _lock_pool(conn: psycopg.Connection[Any], pool: str) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))", (_LOCK_CLASS, pool))


def _counts(conn: psycopg.Connection[Any], pool: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT upstream, count(*) FROM gateway_tickets"
        " WHERE pool = %s AND upstream IS NOT NULL GROUP BY upstream",
        (pool,),
    ).fetchall()
    return {str(k): int(n) for k, n in rows}


def _reserve_sql(
    conn: psycopg.Connection[Any],
    replica: int,
    pool: str,
    offers: Sequence[_Offer],
    max_queue: int,
    token: str,
) -> tuple[int, str | None, int]:
    """Insert this replica's place: (seq, granted key or None, 1-based queue position)."""
    with conn.transaction():
        _lock_pool(conn, pool)
        queued = conn.execute(
            "SELECT count(*) FROM gateway_tickets WHERE pool = %s AND upstream IS NULL", (pool,)
        ).fetchone()
        waiting = int(queued[0]) if queued else 0
        key = _pick(offers, _counts(conn, pool)) if waiting == 0 else None
        if key is None and waiting >= max_queue:
            raise CapacityExhausted(
                f"{waiting} requests already queued across the cluster",
                retry_after=DEFAULT_RETRY_AFTER,
            )
        row = conn.execute(
            "INSERT INTO gateway_tickets (pool, replica, upstream, granted_at, token)"
            " VALUES (%s, %s, %s, CASE WHEN %s::text IS NULL THEN NULL ELSE now() END, %s)"
            " RETURNING seq",
            (pool, replica, key, key, token),
        ).fetchone()
        assert row is not None
        return int(row[0]), key, 0 if key is not None else waiting + 1


def _dispatch_sql(
    conn: psycopg.Connection[Any],
    replica: int,
    pool: str,
    offers: Sequence[_Offer],
    *,
    reconcile: bool,
) -> _PoolState:
    """Grant this replica's places at the head of the pool's queue while there is room; with
    ``reconcile``, also report every grant this replica already holds."""
    state = _PoolState()
    with conn.transaction():
        _lock_pool(conn, pool)
        counts = _counts(conn, pool)
        queue = conn.execute(
            "SELECT seq, replica FROM gateway_tickets"
            " WHERE pool = %s AND upstream IS NULL ORDER BY seq",
            (pool,),
        ).fetchall()
        head = 0
        while head < len(queue) and (key := _pick(offers, counts)) is not None:
            seq, owner = queue[head]
            if owner != replica:
                # The head is another replica's to grant: wake it, grant nothing behind it.
                state.notify = True
                break
            conn.execute(
                "UPDATE gateway_tickets SET upstream = %s, granted_at = now() WHERE seq = %s",
                (key, seq),
            )
            counts[key] = counts.get(key, 0) + 1
            state.granted.append((int(seq), key))
            head += 1
        for position, (seq, owner) in enumerate(queue[head:], start=1):
            if owner == replica:
                state.positions[int(seq)] = position
        if reconcile:
            # Grants made by an earlier check whose answer never arrived (it failed or was
            # abandoned) are this replica's all the same.
            mine = conn.execute(
                "SELECT seq, upstream FROM gateway_tickets"
                " WHERE pool = %s AND replica = %s AND upstream IS NOT NULL",
                (pool, replica),
            ).fetchall()
            state.held = [(int(seq), str(key)) for seq, key in mine]
        state.sessions = sum(counts.values())
        state.queued = len(queue) - head
    return state


@dataclass(eq=False)
class _ClusterTicket(Ticket):
    """A place that is a row in ``gateway_tickets`` (``seq``)."""

    seq: int = 0
    _failure: BaseException | None = None

    def _fail(self, exc: BaseException) -> None:
        if self.lease is None and self._failure is None:
            self._failure = exc
            self._granted.set()

    async def wait(self, report: Callable[[int], None] | None = None) -> Lease:
        if self._released:
            raise RuntimeError("this ticket was released")
        if self.lease is None:
            self._report = report
            if report is not None:
                report(self.position)
            with anyio.move_on_at(self.deadline):
                await self._granted.wait()
            if self._failure is not None:
                await self.release()
                raise self._failure
            if self.lease is None:
                await self.release()
                admission = self._admission
                raise CapacityTimeout(f"still queued after {admission.queue_timeout:g} s")
        assert self.lease is not None
        return self.lease

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._report = None
        self.position = 0
        admission = self._admission
        assert isinstance(admission, ClusterAdmission)
        admission._forget(self)


class ClusterAdmission(Admission):
    """An engine's admission, shared with every replica on the same database.

    Figures (``active``, ``queue_length``, ``sessions()``) are this replica's own;
    ``cluster_sessions`` and ``cluster_queue`` are the whole cluster's at the last check.
    """

    def __init__(self, cluster: Cluster, pool: str, local: Admission) -> None:
        super().__init__(
            local.capacities, max_queue=local.max_queue, queue_timeout=local.queue_timeout
        )
        self._cluster = cluster
        self.pool = pool
        self._tickets: dict[int, _ClusterTicket] = {}
        self._leases: dict[int, Lease] = {}
        self.cluster_sessions = 0
        self.cluster_queue = 0

    @property
    def cluster(self) -> Cluster:
        """The replica's membership this admission shares through."""
        return self._cluster

    @property
    def queue_length(self) -> int:
        return sum(1 for t in self._tickets.values() if t.lease is None)

    def shared_figures(self) -> dict[str, int]:
        return {
            CLUSTER_SESSIONS: self.cluster_sessions,
            CLUSTER_QUEUE_LENGTH: self.cluster_queue,
        }

    def _offers(self) -> list[_Offer]:
        now = anyio.current_time()
        return [
            _Offer(u.key, u.capacity, u.healthy)
            for u in self._upstreams.values()
            if u.healthy or (now >= u.retry_at and u.probe is None)
        ]

    def reserve(self) -> Ticket:
        raise RuntimeError("a cluster admission reserves in its database: use `await admit()`")

    async def admit(self) -> Ticket:
        """Take a place in the cluster: a lease at once if there is room and nobody waits
        anywhere, else the back of the one queue.

        Raises:
            CapacityExhausted: ``max_queue`` requests already wait across the cluster.
            UpstreamUnavailable: this replica cannot reach the database (it admits nothing).
        """
        cluster = self._cluster
        replica = cluster._check_admitting()
        deadline = anyio.current_time() + self.queue_timeout
        offers = self._offers()
        token = uuid.uuid4().hex
        finished = threading.Event()

        def reserve(conn: psycopg.Connection[Any]) -> tuple[int, str | None, int]:
            try:
                return _reserve_sql(conn, replica, self.pool, offers, self.max_queue, token)
            finally:
                finished.set()

        try:
            seq, key, position = await cluster._db(reserve)
        except CapacityExhausted:
            raise
        except BaseException:
            # Timed out, failed or cancelled: its row may exist all the same (the answer of a
            # commit can be lost). The next good check after the call ends deletes it.
            cluster._abandoned[token] = finished
            raise
        # No checkpoint from here on: a caller cancelled during the call still gets its
        # ticket registered, and releases it on the way out.
        ticket = _ClusterTicket(self, deadline, seq=seq)
        self._tickets[seq] = ticket
        if key is not None:
            self._grant(ticket, key)
        else:
            ticket.position = position
        return ticket

    def _grant(self, ticket: _ClusterTicket, key: str) -> None:
        lease = self._take(self._upstreams[key])
        self._leases[ticket.seq] = lease
        ticket._grant(lease)

    def _forget(self, ticket: _ClusterTicket) -> None:
        """A local ticket is done: drop it here, and delete its row on the next check."""
        self._tickets.pop(ticket.seq, None)
        lease = self._leases.pop(ticket.seq, None)
        if lease is not None:
            u = lease._upstream
            u.sessions -= 1
            if u.probe is lease:
                u.probe = None
        self._cluster._release(ticket.seq)

    def _dispatch(self) -> None:
        # Grants happen in the database: a local event (an upstream healthy again) asks for a
        # check instead.
        self._cluster._wake()

    def _reroute(self, lease: Lease) -> bool:
        return False

    def _apply(self, state: _PoolState) -> None:
        for seq, key in (*state.granted, *state.held):
            ticket = self._tickets.get(seq)
            if ticket is not None and ticket.lease is None:
                self._grant(ticket, key)
        for seq, position in state.positions.items():
            ticket = self._tickets.get(seq)
            if ticket is not None and ticket.lease is None and ticket.position != position:
                ticket._moved(position)
        self.cluster_sessions, self.cluster_queue = state.sessions, state.queued

    def _fence(self, reason: str) -> None:
        """Give up every local place: revoke running leases, fail queued tickets."""
        for ticket in list(self._tickets.values()):
            if ticket.lease is not None:
                ticket.lease.revoke(reason)
            else:
                ticket._fail(UpstreamUnavailable(reason, retry_after=1.0))


class Cluster:
    """This replica's membership in the cluster, and the admissions it shares."""

    def __init__(self, url: str, config: ClusterConfig) -> None:
        self.url = url
        self.replica = config.replica_name()
        self.heartbeat = config.heartbeat
        self.lease_ttl = config.lease_ttl
        self._admissions: dict[str, ClusterAdmission] = {}
        self._id: int | None = None
        self._released: set[int] = set()
        # A check failed since the last good one: the next reconciles its grants.
        self._unsure = False
        # Reservations whose answer was lost, by token: set once their call has ended.
        self._abandoned: dict[str, threading.Event] = {}
        self._wakeup = anyio.Event()
        self._problem: str | None = "cluster admission: not registered yet"
        self._last_ok = -math.inf
        self._fenced = False
        self._stop = threading.Event()
        self._pool: _pg.Pool | None = None

    # -- figures -----------------------------------------------------------------------------
    def problem(self) -> str | None:
        """None while this replica admits; otherwise why it does not."""
        return self._problem

    @property
    def lost_reservations(self) -> int:
        """Reservations whose answer was lost and whose rows no check has deleted yet."""
        return len(self._abandoned)

    def admission(self, pool: str, local: Admission) -> ClusterAdmission:
        """The shared admission for engine ``pool``, with ``local``'s caps and queue limits."""
        shared = ClusterAdmission(self, pool, local)
        self._admissions[pool] = shared
        return shared

    # -- database calls ------------------------------------------------------------------------
    async def _db(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``fn`` with a pooled connection on a worker thread, for at most _CALL_TIMEOUT."""
        pool = self._pool
        if pool is None:
            raise UpstreamUnavailable("cluster admission is closed")

        try:
            # Abandoned on a deadline or a cancellation: a connection whose peer went silent
            # can hang past any socket timeout, and every call here is safe to leave running
            # (a check after a failed one reconciles; a reservation's row is found by its token).
            return await _pg.call(pool, fn, deadline=_CALL_TIMEOUT)
        except (psycopg.Error, TimeoutError) as exc:
            self._failed(exc)
            raise UpstreamUnavailable(
                f"cluster admission: database error: {exc}".rstrip(": "),
                retry_after=max(1.0, self.heartbeat),
            ) from exc

    def _check_admitting(self) -> int:
        if self._problem is not None or self._id is None:
            raise UpstreamUnavailable(
                self._problem or "cluster admission: not registered",
                retry_after=max(1.0, self.heartbeat),
            )
        return self._id

    def _failed(self, exc: BaseException) -> None:
        since = anyio.current_time() - self._last_ok
        what = f"PostgreSQL unreachable for {since:.1f} s" if since < math.inf else "PostgreSQL"
        self._problem = f"cluster admission: {what} ({type(exc).__name__}: {exc})".strip()

    def _wake(self) -> None:
        self._wakeup.set()

    def _release(self, seq: int) -> None:
        self._released.add(seq)
        self._wake()

    # -- the check ------------------------------------------------------------------------------
    def _register_sql(self, conn: psycopg.Connection[Any]) -> int:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO gateway_replicas (name) VALUES (%s) RETURNING id", (self.replica,)
            ).fetchone()
        assert row is not None
        return int(row[0])

    def _check_sql(
        self,
        conn: psycopg.Connection[Any],
        replica: int,
        released: list[int],
        abandoned: list[str],
        pools: list[tuple[str, list[_Offer]]],
        reconcile: bool,
    ) -> dict[str, _PoolState]:
        notify = False
        with conn.transaction():
            beat = conn.execute(
                "UPDATE gateway_replicas SET heartbeat_at = now() WHERE id = %s", (replica,)
            )
            if beat.rowcount == 0:
                raise _Expired
            if released:
                gone = conn.execute(
                    "DELETE FROM gateway_tickets WHERE replica = %s AND seq = ANY(%s)",
                    (replica, released),
                )
                notify |= gone.rowcount > 0
            if abandoned:
                lost = conn.execute(
                    "DELETE FROM gateway_tickets WHERE replica = %s AND token = ANY(%s)",
                    (replica, abandoned),
                )
                notify |= lost.rowcount > 0
            dead = conn.execute(
                "DELETE FROM gateway_replicas"
                " WHERE heartbeat_at < now() - make_interval(secs => %s) RETURNING name",
                (self.lease_ttl,),
            ).fetchall()
            for (name,) in dead:
                log.warning("replica %s missed its heartbeats: its places are free", name)
            notify |= bool(dead)
        states = {}
        for pool, offers in pools:
            states[pool] = state = _dispatch_sql(conn, replica, pool, offers, reconcile=reconcile)
            notify |= state.notify or bool(state.granted)
        if notify:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(replica)))
        return states

    async def _check(self) -> None:
        if self._id is None:
            self._id = await self._db(self._register_sql)
            log.info("replica %s joined the cluster as %d", self.replica, self._id)
        replica = self._id
        released = sorted(self._released)
        abandoned = [token for token, ended in self._abandoned.items() if ended.is_set()]
        pools = [(name, a._offers()) for name, a in self._admissions.items()]
        reconcile = self._unsure
        started = anyio.current_time()
        try:
            states = await self._db(
                lambda conn: self._check_sql(conn, replica, released, abandoned, pools, reconcile)
            )
        except UpstreamUnavailable:
            # A lost connection may hide an _Expired, or grants made by a check whose answer
            # was lost: the next good check finds out.
            self._unsure = True
            return
        except _Expired:
            self._rejoin()
            return
        self._released.difference_update(released)
        for token in abandoned:
            del self._abandoned[token]
        self._last_ok, self._problem, self._fenced = started, None, False
        self._unsure = False
        for name, state in states.items():
            self._admissions[name]._apply(state)

    def _rejoin(self) -> None:
        reason = "cluster admission: this replica was taken for dead and lost its places"
        log.warning("replica %s: %s", self.replica, reason)
        for admission in self._admissions.values():
            admission._fence(reason)
        self._id = None
        self._released.clear()
        self._abandoned.clear()

    def _check_fence(self) -> None:
        if self._id is None:
            return
        silent = anyio.current_time() - self._last_ok
        # A check hanging on a dead connection has not failed yet, but admits nothing either.
        if silent > 3 * self.heartbeat and self._problem is None:
            self._problem = f"cluster admission: no answer from PostgreSQL for {silent:.1f} s"
        # Past lease_ttl after the last good check the others may take this replica's places:
        # stop its sessions one heartbeat before that.
        if not self._fenced and silent > self.lease_ttl - self.heartbeat:
            self._fenced = True
            reason = self._problem or "cluster admission: PostgreSQL unreachable"
            log.error("replica %s ends its sessions: %s", self.replica, reason)
            for admission in self._admissions.values():
                admission._fence(reason)

    async def _run_checks(self) -> None:
        while True:
            with anyio.move_on_after(self.heartbeat):
                await self._wakeup.wait()
            self._wakeup = anyio.Event()
            with suppress(UpstreamUnavailable):
                await self._check()

    async def _run_fence(self) -> None:
        # On its own clock: a check can hang in a dead connection for _DB_TIMEOUT, longer than
        # the margin the fence has.
        while True:
            await anyio.sleep(self.heartbeat / 4)
            self._check_fence()

    # -- the listener --------------------------------------------------------------------------
    def _listen(self, wake: Callable[[], None]) -> None:
        """Blocks on a worker thread until ``_stop``: calls ``wake`` for every notification."""
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, **_connect_options(self.replica)) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    wake()  # anything sent while it was not listening
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=_LISTEN_POLL):
                            # Its own notifications tell this replica nothing new.
                            if note.payload != str(self._id):
                                wake()
            except psycopg.Error as exc:
                log.debug("admission listener reconnects: %s", exc)
                self._stop.wait(_LISTEN_POLL)

    async def _run_listener(self) -> None:
        def wake() -> None:
            with suppress(RuntimeError):  # the event loop is gone: nobody to wake
                anyio.from_thread.run_sync(self._wake)

        # Abandoned when cancelled: the thread ends by itself within _LISTEN_POLL of _stop (or
        # a connect timeout), and shutdown need not wait for it.
        await anyio.to_thread.run_sync(self._listen, wake, abandon_on_cancel=True)

    # -- life ------------------------------------------------------------------------------------
    async def _deregister(self) -> None:
        replica = self._id
        if replica is None or self._pool is None:
            return

        def q(conn: psycopg.Connection[Any]) -> None:
            conn.execute("DELETE FROM gateway_replicas WHERE id = %s", (replica,))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(replica)))

        with anyio.move_on_after(_DB_TIMEOUT, shield=True), suppress(UpstreamUnavailable):
            await self._db(q)
            self._id = None


@asynccontextmanager
async def open_cluster(url: str, config: ClusterConfig) -> AsyncIterator[Cluster]:
    """Join the cluster on the database at ``url`` (migrated by the store) until the block exits;
    on exit this replica's places go back to the others at once."""
    cluster = Cluster(url, config)

    def open_pool() -> _pg.Pool:
        pool = _pg.connection_pool(
            url,
            min_size=1,
            max_size=_POOL_SIZE,
            max_wait=_DB_TIMEOUT,
            dead_after=_DB_TIMEOUT,
            statement_timeout=_DB_TIMEOUT,
            name=_name(cluster.replica),
        )
        pool.open(wait=False)
        return pool

    cluster._pool = await anyio.to_thread.run_sync(open_pool)
    try:
        async with anyio.create_task_group() as tg:
            with suppress(UpstreamUnavailable):
                await cluster._check()
            tg.start_soon(cluster._run_checks)
            tg.start_soon(cluster._run_fence)
            tg.start_soon(cluster._run_listener)
            try:
                yield cluster
            finally:
                cluster._stop.set()
                tg.cancel_scope.cancel()
        # Once no check can register it again.
        await cluster._deregister()
    finally:
        pool, cluster._pool = cluster._pool, None
        if pool is not None:
            # Bounded: a thread stuck on a silent connection keeps its connection, not us.
            with anyio.move_on_after(_DB_TIMEOUT, shield=True):
                await anyio.to_thread.run_sync(
                    partial(pool.close, timeout=1.0), abandon_on_cancel=True
                )
