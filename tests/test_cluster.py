"""Cluster-wide admission (gateway.cluster) on a real PostgreSQL, several replicas in one process.

Each ``open_cluster`` is one replica: its own connections, its own listener, its own heartbeat,
as in separate processes. The cases vary what replicas may do at once: reserve together, leave
in any order, die without a word, or lose the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import psycopg
import pytest
import trio
import trio.testing
from blackhole import Blackhole
from conftest import make_config, run_gateway, wait_until
from pg import pg_server

from gateway.admission import Admission, Lease, Ticket
from gateway.cluster import Cluster, ClusterAdmission, open_cluster
from gateway.config import ClusterConfig
from gateway.errors import CapacityExhausted, UpstreamUnavailable
from gateway.store_pg import migrate

pytestmark = pytest.mark.anyio

FAST = ClusterConfig(heartbeat=0.2, lease_ttl=1.0)


def migrated(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
    return url


@asynccontextmanager
async def replicas(
    url: str, count: int, caps: dict[str, int], *, max_queue: int = 16, config: ClusterConfig = FAST
) -> AsyncIterator[list[ClusterAdmission]]:
    """``count`` replicas sharing pool "pool" with upstream caps ``caps``."""
    async with AsyncExitStack() as stack:
        shared = []
        for i in range(count):
            replica_config = ClusterConfig(
                replica=f"r{i}", heartbeat=config.heartbeat, lease_ttl=config.lease_ttl
            )
            cluster = await stack.enter_async_context(open_cluster(url, replica_config))
            await wait_admitting(cluster)
            shared.append(cluster.admission("pool", Admission(caps, max_queue=max_queue)))
        yield shared


async def wait_admitting(cluster: Cluster) -> None:
    await eventually(lambda: cluster.problem() is None)


async def eventually(check: Callable[[], bool]) -> None:
    """Poll a condition another replica makes true (its own thread, its own connection)."""
    await wait_until(check)


def rows(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


async def test_a_cap_holds_across_replicas_and_a_freed_place_goes_to_the_other(
    pg_url: str,
) -> None:
    url = migrated(pg_url)
    with trio.fail_after(30):
        async with replicas(url, 2, {"u": 1}) as (a, b):
            first = await a.admit()
            assert first.lease is not None and first.lease.key == "u"
            second = await b.admit()
            assert second.lease is None and second.position == 1
            assert a.active == 1 and b.active == 0 and b.queue_length == 1
            await first.release()
            # B learns of the freed place by NOTIFY, not by its next heartbeat's poll.
            with trio.fail_after(FAST.heartbeat * 0.9):
                lease = await second.wait()
            assert lease.key == "u" and b.active == 1
            await second.release()
            await eventually(lambda: rows(url, "SELECT count(*) FROM gateway_tickets") == [(0,)])


async def test_one_fifo_across_replicas_with_positions_that_move_up(pg_url: str) -> None:
    url = migrated(pg_url)
    with trio.fail_after(30):
        async with replicas(url, 3, {"u": 1}) as shared:
            holder = await shared[0].admit()
            order: list[int] = []
            seen: dict[int, list[int]] = {}
            # Queued in this order, alternating replicas: r1, r2, r0, r1.
            owners = [1, 2, 0, 1]
            tickets: list[Ticket] = []
            for owner in owners:
                tickets.append(await shared[owner].admit())
            assert [t.position for t in tickets] == [1, 2, 3, 4]

            async def run(i: int, ticket: Ticket) -> None:
                seen[i] = []
                async with ticket.granted(seen[i].append):
                    order.append(i)

            async with trio.open_nursery() as nursery:
                for i, ticket in enumerate(tickets):
                    nursery.start_soon(run, i, ticket)
                await trio.testing.wait_all_tasks_blocked()
                await holder.release()
            assert order == [0, 1, 2, 3]
            for i, positions in seen.items():
                assert positions[0] == i + 1
                assert positions == sorted(positions, reverse=True)


async def test_concurrent_reservations_on_two_replicas_never_exceed_the_cap(
    pg_url: str,
) -> None:
    url = migrated(pg_url)
    running = peak = 0
    outcomes: list[str] = []
    with trio.fail_after(60):
        async with replicas(url, 2, {"u": 2}, max_queue=5) as (a, b):

            async def one(admission: ClusterAdmission) -> None:
                nonlocal running, peak
                try:
                    ticket = await admission.admit()
                except CapacityExhausted:
                    outcomes.append("refused")
                    return
                outcomes.append("placed")
                async with ticket.granted():
                    running += 1
                    peak = max(peak, running)
                    await trio.sleep(0.02)
                    running -= 1

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, a if i % 2 else b)
        assert sorted(outcomes) == ["placed"] * 7 + ["refused"] * 13
        assert peak == 2
        assert rows(url, "SELECT count(*) FROM gateway_tickets") == [(0,)]


async def test_a_silent_replicas_places_are_freed_after_the_lease_ttl(pg_url: str) -> None:
    url = migrated(pg_url)
    # A replica that stopped heartbeating (killed) still holds the only place.
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO gateway_replicas (name, heartbeat_at) VALUES ('dead', now()) RETURNING id"
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO gateway_tickets (pool, replica, upstream, granted_at)"
            " VALUES ('pool', %s, 'u', now())",
            (row[0],),
        )
    with trio.fail_after(30):
        async with replicas(url, 1, {"u": 1}) as (live,):
            ticket = await live.admit()
            assert ticket.lease is None and ticket.position == 1
            start = trio.current_time()
            await ticket.wait()
            waited = trio.current_time() - start
            # Freed once its heartbeat is lease_ttl old, at the next check after that.
            assert waited <= FAST.lease_ttl + 2 * FAST.heartbeat + 1.0
            assert rows(url, "SELECT name FROM gateway_replicas") == [("r0",)]
            await ticket.release()


async def test_the_queue_limit_counts_the_whole_cluster(pg_url: str) -> None:
    url = migrated(pg_url)
    with trio.fail_after(30):
        async with replicas(url, 2, {"u": 1}, max_queue=2) as (a, b):
            held = [await a.admit(), await b.admit(), await a.admit()]
            assert [t.position for t in held] == [0, 1, 2]
            with pytest.raises(CapacityExhausted) as refused:
                await b.admit()
            assert refused.value.retry_after
            for ticket in held:
                await ticket.release()


async def test_a_replica_that_loses_postgresql_stops_admitting_then_ends_its_sessions() -> None:
    config = ClusterConfig(heartbeat=0.2, lease_ttl=1.5)
    with pg_server() as server:
        url = migrated(server.create_database())
        with trio.fail_after(60):
            async with replicas(url, 1, {"u": 2}, config=config) as (a,):
                running = await a.admit()
                queued_behind = await a.admit()
                waiting = await a.admit()
                assert waiting.lease is None
                server.stop("immediate")
                cluster = a.cluster
                await eventually(lambda: cluster.problem() is not None)
                assert "PostgreSQL" in (cluster.problem() or "")
                with pytest.raises(UpstreamUnavailable):
                    await a.admit()
                # Its leases may be taken after lease_ttl: it revokes them one heartbeat before.
                assert running.lease is not None
                reason = await revoked(running.lease)
                assert "PostgreSQL" in reason
                with pytest.raises(UpstreamUnavailable):
                    await waiting.wait()
                await running.release()
                await queued_behind.release()
                server.start()
                await wait_admitting(cluster)
                again = await a.admit()
                assert again.lease is not None
                await again.release()


async def revoked(lease: Lease) -> str:
    return await lease.wait_revoked()


async def test_a_short_postgresql_restart_keeps_running_sessions() -> None:
    config = ClusterConfig(heartbeat=0.2, lease_ttl=10.0)
    with pg_server() as server:
        url = migrated(server.create_database())
        with trio.fail_after(60):
            async with replicas(url, 2, {"u": 1}, config=config) as (a, b):
                running = await a.admit()
                server.stop("fast")
                server.start()
                await wait_admitting(a.cluster)
                await wait_admitting(b.cluster)
                queued = await b.admit()
                assert queued.lease is None, "the running lease survived the restart"
                assert running.lease is not None and not running.lease._revoked.is_set()
                await running.release()
                await queued.wait()
                await queued.release()


async def test_only_capped_engines_on_shared_upstreams_share_their_admission(
    tmp_path: Path, pg_url: str
) -> None:
    """An embedded engine's cap is its replica's cores, and an uncapped engine queues nothing:
    they keep their own admission. A capped upstream pool shares it."""
    config = make_config(
        tmp_path,
        store={"url": pg_url},
        engines={
            "embedded": {"kind": "whisper", "workers": 1},
            "free": {"kind": "scripted", "words": ["a"]},
            "capped": {"kind": "scripted", "words": ["a"], "max_sessions": 2},
            "wlk": {"kind": "whisperlivekit", "urls": ["ws://127.0.0.1:9/asr"]},
        },
    )
    with trio.fail_after(60):
        async with run_gateway(config) as gw:
            admissions = {name: engine.admission for name, engine in gw.state.engines.items()}
    assert {name for name, a in admissions.items() if isinstance(a, ClusterAdmission)} == {
        "capped",
        "wlk",
    }


async def test_a_replica_cut_off_from_postgresql_ends_its_session_before_others_reuse_it(
    pg_url: str,
) -> None:
    """The network split: replica A loses its path to PostgreSQL without a word (a blackhole,
    not a refusal), B keeps it. A must revoke its lease before B can be granted the place: the
    upstream never has two sessions."""
    url = migrated(pg_url)
    config = ClusterConfig(heartbeat=0.25, lease_ttl=1.5)
    moments: dict[str, float] = {}
    proxy = Blackhole(int(str(psycopg.conninfo.conninfo_to_dict(url)["port"])))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            via_proxy = psycopg.conninfo.make_conninfo(url, port=port)
            async with AsyncExitStack() as stack:
                a_cluster = await stack.enter_async_context(
                    open_cluster(via_proxy, ClusterConfig(replica="a", **config_of(config)))
                )
                b_cluster = await stack.enter_async_context(
                    open_cluster(url, ClusterConfig(replica="b", **config_of(config)))
                )
                await wait_admitting(a_cluster)
                await wait_admitting(b_cluster)
                a = a_cluster.admission("pool", Admission({"u": 1}))
                b = b_cluster.admission("pool", Admission({"u": 1}))
                held = await a.admit()
                waiting = await b.admit()
                assert held.lease is not None and waiting.lease is None

                async def revoked() -> None:
                    assert held.lease is not None
                    await held.lease.wait_revoked()
                    moments["revoked"] = trio.current_time()

                async def granted() -> None:
                    await waiting.wait()
                    moments["granted"] = trio.current_time()

                async with trio.open_nursery() as watchers:
                    watchers.start_soon(revoked)
                    watchers.start_soon(granted)
                    proxy.cut()
                assert moments["revoked"] < moments["granted"]
                assert a_cluster.problem() is not None and b_cluster.problem() is None
                await waiting.release()
                await held.release()
            nursery.cancel_scope.cancel()


def config_of(config: ClusterConfig) -> dict[str, float]:
    return {"heartbeat": config.heartbeat, "lease_ttl": config.lease_ttl}


async def test_a_reservation_whose_caller_left_gives_its_row_back(pg_url: str) -> None:
    """A caller cancelled while its reservation waits for the pool lock: the transaction goes on
    in its thread and inserts the row after all. Its token finds it; the place is not lost."""
    url = migrated(pg_url)
    with trio.fail_after(30):
        async with replicas(url, 1, {"u": 1}) as (a,):
            with psycopg.connect(url) as blocker:
                blocker.execute("SELECT pg_advisory_xact_lock(26465, hashtext('pool'))")
                with trio.move_on_after(0.3) as left:
                    await a.admit()
                assert left.cancelled_caught
                assert a.cluster.lost_reservations == 1
                blocker.commit()  # the abandoned reservation now inserts its row
            # Once its thread has ended, a check deletes the row by its token.
            await eventually(lambda: a.cluster.lost_reservations == 0)
            assert rows(url, "SELECT count(*) FROM gateway_tickets") == [(0,)]
            # The only place is free: the next client runs at once.
            ticket = await a.admit()
            assert ticket.lease is not None
            await ticket.release()
