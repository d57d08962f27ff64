"""Admission control: caps, FIFO queue and positions, timeouts, cancellation, health and routing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from gateway.admission import DEFAULT_RETRY_AFTER, RENUMBER_DELAY, Admission, Lease
from gateway.errors import CapacityExhausted, CapacityTimeout

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


async def hold(
    admission: Admission,
    release: trio.Event,
    leases: list[Lease] | None = None,
    positions: list[int] | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Acquire (reporting positions), then hold the lease until ``release`` is set."""
    on_queued: Callable[[int], None] | None = positions.append if positions is not None else None
    task_status.started()
    async with admission.acquire(on_queued) as lease:
        if leases is not None:
            leases.append(lease)
        await release.wait()


async def test_grants_go_to_the_upstream_with_the_fewest_sessions() -> None:
    admission = Admission({"a": 2, "b": 2, "c": 1}, max_queue=10, queue_timeout=60)
    with trio.fail_after(10):
        release = trio.Event()
        leases: list[Lease] = []
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                await nursery.start(hold, admission, release, leases)
                await trio.testing.wait_all_tasks_blocked()
            assert [lease.key for lease in leases] == ["a", "b", "c", "a", "b"]
            assert admission.sessions() == {"a": 2, "b": 2, "c": 1}
            assert admission.active == 5
            release.set()
        assert admission.active == 0
        assert admission.peak_sessions == 5


async def test_waiters_are_served_fifo_and_positions_only_decrease() -> None:
    admission = Admission({"a": 1}, max_queue=10, queue_timeout=60)
    with trio.fail_after(10):
        releases = [trio.Event() for _ in range(4)]
        positions: list[list[int]] = [[] for _ in range(4)]
        leases: list[Lease] = []
        order: list[int] = []

        async def client(i: int) -> None:
            async with admission.acquire(positions[i].append):
                order.append(i)
                await releases[i].wait()

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(client, i)
                await trio.testing.wait_all_tasks_blocked()
            assert admission.queue_length == 3
            for i in range(4):
                releases[i].set()
                await trio.testing.wait_all_tasks_blocked()
        assert order == [0, 1, 2, 3]
        assert positions == [[], [1], [2, 1], [3, 2, 1]]
        assert not leases


async def test_past_max_queue_requests_are_refused_at_once() -> None:
    admission = Admission({"a": 1}, max_queue=2, queue_timeout=60)
    with trio.fail_after(10):
        release = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                await nursery.start(hold, admission, release)
                await trio.testing.wait_all_tasks_blocked()
            assert admission.queue_length == 2
            with pytest.raises(CapacityExhausted):
                admission.reserve()
            with pytest.raises(CapacityExhausted) as refused:
                async with admission.acquire():
                    pass
            assert refused.value.retry_after == DEFAULT_RETRY_AFTER
            assert admission.queue_length == 2
            release.set()
        assert admission.active == 0


async def test_max_queue_zero_never_queues() -> None:
    admission = Admission({"a": 1}, max_queue=0, queue_timeout=60)
    with trio.fail_after(10):
        async with admission.acquire():
            with pytest.raises(CapacityExhausted):
                admission.reserve()
            with pytest.raises(CapacityExhausted):
                async with admission.acquire():
                    pass
        async with admission.acquire():
            pass


async def test_queue_timeout_raises_capacity_timeout_and_leaves_the_queue() -> None:
    admission = Admission({"a": 1}, max_queue=10, queue_timeout=30)
    with trio.fail_after(100):
        release = trio.Event()
        behind: list[int] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(hold, admission, release)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()

            async def times_out() -> None:
                with pytest.raises(CapacityTimeout):
                    async with admission.acquire():
                        pass

            nursery.start_soon(times_out)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(10)
            await nursery.start(hold, admission, release, None, behind)
            await trio.sleep(25)
            # The first waiter timed out at 30 s; the one behind it moved up.
            assert admission.queue_length == 1
            assert behind == [2, 1]
            assert trio.current_time() - start == pytest.approx(35)
            release.set()
        assert admission.active == 0


async def test_cancelled_waiters_leave_and_those_behind_move_up() -> None:
    admission = Admission({"a": 1}, max_queue=10, queue_timeout=60)
    with trio.fail_after(10):
        release = trio.Event()
        behind: list[int] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(hold, admission, release)
            scope = trio.CancelScope()

            async def cancelled() -> None:
                with scope:
                    async with admission.acquire():
                        pytest.fail("a cancelled waiter must not be granted")

            nursery.start_soon(cancelled)
            await trio.testing.wait_all_tasks_blocked()
            await nursery.start(hold, admission, release, None, behind)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            # Gone from the queue at once; those behind move up within RENUMBER_DELAY.
            assert admission.queue_length == 1
            assert behind == [2]
            await trio.sleep(RENUMBER_DELAY)
            await trio.testing.wait_all_tasks_blocked()
            assert behind == [2, 1]
            release.set()
        assert admission.active == 0
        assert admission.queue_length == 0


async def test_departures_together_share_one_renumbering() -> None:
    admission = Admission({"a": 1}, max_queue=100, queue_timeout=60)
    with trio.fail_after(10):
        release = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(hold, admission, release)
            positions: list[list[int]] = []
            scopes: list[trio.CancelScope] = []

            async def waiter(scope: trio.CancelScope, seen: list[int]) -> None:
                with scope:
                    await hold(admission, release, None, seen)

            for _ in range(6):
                scopes.append(trio.CancelScope())
                positions.append([])
                nursery.start_soon(waiter, scopes[-1], positions[-1])
                await trio.testing.wait_all_tasks_blocked()
            assert [p[-1] for p in positions] == [1, 2, 3, 4, 5, 6]
            # Positions 1, 3 and 4 leave at once; 2, 5 and 6 move up once each, to 1, 2, 3.
            for i in (0, 2, 3):
                scopes[i].cancel()
            await trio.sleep(RENUMBER_DELAY)
            await trio.testing.wait_all_tasks_blocked()
            assert [positions[i] for i in (1, 4, 5)] == [[2, 1], [5, 2], [6, 3]]
            assert admission.queue_length == 3
            release.set()
        assert admission.active == 0 and admission.queue_length == 0


async def test_a_slot_granted_to_a_cancelled_waiter_is_handed_on() -> None:
    admission = Admission({"a": 1}, max_queue=10, queue_timeout=60)
    with trio.fail_after(10):
        first_release, rest_release = trio.Event(), trio.Event()
        granted: list[str] = []
        scope = trio.CancelScope()

        async def second() -> None:
            with scope:
                async with admission.acquire():
                    granted.append("second")
                    await trio.sleep_forever()

        async def third() -> None:
            async with admission.acquire():
                granted.append("third")
                await rest_release.wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(hold, admission, first_release)
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(third)
            await trio.testing.wait_all_tasks_blocked()
            # Release the first lease and cancel the second waiter in the same step.
            first_release.set()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert granted[-1] == "third"
            assert admission.active == 1
            rest_release.set()
        assert admission.active == 0


async def test_an_unhealthy_upstream_is_avoided_then_probed_once() -> None:
    admission = Admission({"a": 1, "b": 1}, max_queue=10, queue_timeout=600)
    with trio.fail_after(100):
        async with admission.acquire() as lease:
            assert lease.key == "a"
            lease.failed(backoff=10.0)
        assert admission.health() == {"a": False, "b": True}
        assert admission.failures("a") == 1
        assert admission.any_healthy()
        # Within the backoff, "a" is not used even though it is empty.
        release = trio.Event()
        leases: list[Lease] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(hold, admission, release, leases)
            await trio.testing.wait_all_tasks_blocked()
            assert leases[0].key == "b"
            start = trio.current_time()
            await nursery.start(hold, admission, release, leases)
            await trio.testing.wait_all_tasks_blocked()
            assert len(leases) == 1 and admission.queue_length == 1
            # The waiter wakes by itself when the backoff ends and probes "a".
            await trio.sleep(9.9)
            assert len(leases) == 1
            await trio.sleep(0.1)
            await trio.testing.wait_all_tasks_blocked()
            assert leases[1].key == "a"
            assert trio.current_time() - start == pytest.approx(10)
            assert admission.sessions() == {"a": 1, "b": 1}
            leases[1].succeeded()
            assert admission.health() == {"a": True, "b": True}
            assert admission.failures("a") == 0
            release.set()


async def test_waiting_for_a_probe_does_not_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    admission = Admission({"a": 2}, max_queue=10, queue_timeout=1000)
    calls = 0
    dispatch = admission._dispatch

    def counting() -> None:
        nonlocal calls
        calls += 1
        dispatch()

    monkeypatch.setattr(admission, "_dispatch", counting)
    with trio.fail_after(2000):
        async with admission.acquire() as probe:
            probe.failed(backoff=5.0)
        await trio.sleep(6)
        release = trio.Event()
        async with trio.open_nursery() as nursery:
            leases: list[Lease] = []
            await nursery.start(hold, admission, release, leases)
            await trio.testing.wait_all_tasks_blocked()
            assert admission.sessions() == {"a": 1}
            # Capacity 2, but "a" is being probed: the next request waits without polling.
            before = calls
            nursery.start_soon(hold, admission, release)
            await trio.sleep(500)
            assert admission.queue_length == 1
            assert calls - before <= 2
            leases[0].succeeded()
            await trio.testing.wait_all_tasks_blocked()
            assert admission.queue_length == 0
            assert admission.sessions() == {"a": 2}
            release.set()


async def test_nothing_healthy_then_recovered() -> None:
    admission = Admission({"a": 1}, max_queue=10, queue_timeout=600)
    with trio.fail_after(100):
        async with admission.acquire() as lease:
            lease.failed(backoff=20.0)
        assert not admission.any_healthy()
        assert "a" in admission.unavailable().detail
        await trio.sleep(20)
        assert admission.any_healthy()


async def test_reroute_moves_a_lease_off_an_unhealthy_upstream() -> None:
    admission = Admission({"a": 1, "b": 1}, max_queue=10, queue_timeout=60)
    with trio.fail_after(10):
        async with admission.acquire() as lease:
            assert lease.key == "a"
            assert not lease.reroute()  # healthy: stays
            lease.failed(backoff=30.0)
            assert lease.reroute()
            assert lease.key == "b"
            assert admission.sessions() == {"a": 0, "b": 1}
            lease.failed(backoff=30.0)
            # Nowhere healthy to go: stays put.
            assert not lease.reroute()
            assert lease.key == "b"
        assert admission.sessions() == {"a": 0, "b": 0}


async def test_reroute_frees_the_slot_for_a_waiter() -> None:
    admission = Admission({"a": 1, "b": 2}, max_queue=10, queue_timeout=60)
    with trio.fail_after(100):
        release = trio.Event()
        leases: list[Lease] = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                await nursery.start(hold, admission, release, leases)
                await trio.testing.wait_all_tasks_blocked()
            assert sorted(lease.key for lease in leases) == ["a", "b", "b"]
            await nursery.start(hold, admission, release, leases)
            await trio.testing.wait_all_tasks_blocked()
            assert admission.queue_length == 1
            (on_a,) = [lease for lease in leases if lease.key == "a"]
            on_a.failed(backoff=1.0)
            # "b" is full: no move; the waiter keeps waiting and will probe "a" when it may.
            assert not on_a.reroute()
            release.set()
        assert admission.active == 0


def test_an_empty_pool_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Admission({}, max_queue=1, queue_timeout=1)
