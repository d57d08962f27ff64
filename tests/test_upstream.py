"""The upstream kit shared by the WebSocket engines, fed with numbers and exceptions (no sockets)."""

from __future__ import annotations

import random

import pytest
import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected

from gateway.config import OpenAIRealtimeConfig, WhisperLiveKitConfig
from gateway.engines._upstream import JITTER, backoff_delay, closed_by, rejected
from gateway.engines.openai_realtime import OpenAIRealtimeEngine
from gateway.engines.whisperlivekit import WhisperLiveKitEngine
from gateway.errors import UpstreamError, collapse_groups
from gateway.metrics import ENGINE_STATS

pytestmark = pytest.mark.anyio


def test_backoff_doubles_from_initial_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, 1.0, 4.0, rng) for n in range(1, 7)]
    for delay, base in zip(delays, [1, 2, 4, 4, 4, 4], strict=True):
        assert base * JITTER[0] <= delay <= base * JITTER[1]
    assert len({round(d / b, 9) for d, b in zip(delays, [1, 2, 4, 4, 4, 4], strict=True)}) > 1
    # However many failures an upstream piles up, the delay stays a number.
    assert backoff_delay(100_000, 1.0, 4.0, rng) <= 4.0
    assert backoff_delay(0, 1.0, 4.0, rng) <= 1.0


@pytest.mark.parametrize(
    ("reason", "code", "transient", "text"),
    [
        (None, 1006, True, "1006"),
        (CloseReason(1001, "going away"), 1001, True, "1001 (going away)"),
        (CloseReason(1005, None), 1005, True, "1005"),
        (CloseReason(1011, ""), 1011, True, "1011"),
        (CloseReason(1012, None), 1012, True, "1012"),
        (CloseReason(1013, None), 1013, True, "1013"),
        (CloseReason(1015, None), 1015, True, "1015"),
        (CloseReason(1000, "bye"), 1000, False, "1000 (bye)"),
        (CloseReason(1008, "policy"), 1008, False, "1008 (policy)"),
        (CloseReason(4000, "beta_api_shape_disabled"), 4000, False, None),
    ],
)
def test_close_codes_are_read_once(
    reason: CloseReason | None, code: int, transient: bool, text: str | None
) -> None:
    closed = closed_by(ConnectionClosed(reason))
    assert (closed.code, closed.transient) == (code, transient)
    if text is not None:
        assert str(closed) == text


@pytest.mark.parametrize(
    ("status", "credentials", "transient"),
    [
        (401, True, False),
        (403, True, False),
        (408, False, True),
        (429, False, True),
        (500, False, True),
        (503, False, True),
        (400, False, False),
        (404, False, False),
    ],
)
def test_refused_handshakes_are_classified_once(
    status: int, credentials: bool, transient: bool
) -> None:
    refusal = rejected(ConnectionRejected(status, (), b"x" * 500))
    assert (refusal.status, refusal.credentials, refusal.transient) == (
        status,
        credentials,
        transient,
    )
    assert refusal.body == "x" * 200


def test_both_upstream_pools_report_the_same_figures_under_the_same_names() -> None:
    wlk = WhisperLiveKitEngine("wlk", WhisperLiveKitConfig(urls=["ws://wlk0/asr"]))
    openai = OpenAIRealtimeEngine("openai", OpenAIRealtimeConfig(url="ws://openai/v1/realtime"))
    wlk_stats, openai_stats = wlk.stats(), openai.stats()
    assert set(wlk_stats) <= set(ENGINE_STATS) and set(openai_stats) <= set(ENGINE_STATS)
    shared = {"sessions", "queue_length", "healthy"}
    assert shared <= set(wlk_stats) & set(openai_stats)
    assert wlk_stats["queue_length"] == openai_stats["queue_length"] == 0
    assert openai_stats["sessions"] == {"ws://openai/v1/realtime": 0}


async def test_the_one_unwrap_keeps_the_cause_a_boundary_gave_the_error() -> None:
    async def fail() -> None:
        try:
            raise OSError("connection refused")
        except OSError as exc:
            raise UpstreamError("cannot connect") from exc

    with pytest.raises(UpstreamError) as info, trio.fail_after(5), collapse_groups():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
            await trio.sleep_forever()
    assert isinstance(info.value.__cause__, OSError)
    # Raised as itself: not chained to the group it was carried in.
    assert not isinstance(info.value.__context__, BaseExceptionGroup)
