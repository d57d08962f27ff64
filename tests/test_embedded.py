"""The embedded PocketSphinx engine on real recordings."""

from __future__ import annotations

import itertools

import pytest
import trio
from audio_util import GOFORWARD, LIBRIVOX, pcm_of

from gateway.config import PocketSphinxConfig
from gateway.engines.base import SessionOptions
from gateway.engines.embedded import PocketSphinxEngine, Recognizer, _new_decoder
from gateway.events import EngineUpdate

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def decoder() -> object:
    return _new_decoder()


def recognise(
    decoder: object, pcm: bytes, chunk: int = 6400
) -> tuple[list[EngineUpdate], EngineUpdate]:
    rec = Recognizer(decoder, PocketSphinxConfig())
    partials = []
    for i in range(0, len(pcm), chunk):
        partials += rec.feed(pcm[i : i + chunk])
    return partials, rec.finish()


def test_final_text_has_batch_accuracy_and_partials_come_every_second(decoder: object) -> None:
    pcm = pcm_of(LIBRIVOX)
    partials, final = recognise(decoder, pcm)
    assert len(partials) >= 20  # 24.7 s of audio, one partial per second of audio or so
    text = " ".join(s.text for s in final.committed)
    for word in ("consider", "respectable", "amiable", "selfish"):
        assert word in text
    assert final.tentative == ()
    assert final.processed == pytest.approx(24.73, abs=0.05)
    # Committed segments only grow, and have sane, ordered times.
    for a, b in itertools.pairwise(partials):
        assert b.committed[: len(a.committed)] == a.committed
    ends = [s.end for s in final.committed]
    assert ends == sorted(ends) and ends[-1] <= 24.8
    assert final.words and all(w.start < w.end for w in final.words)


def test_speech_ending_on_a_frame_boundary_is_not_lost(decoder: object) -> None:
    # goforward ends mid-speech when cut here; 960 bytes is the endpointer's frame.
    pcm = pcm_of(GOFORWARD)
    cut = pcm[: (int(2.3 * 32000) // 960) * 960]
    assert len(cut) % 960 == 0
    _, final = recognise(decoder, cut, chunk=960)
    text = " ".join(s.text for s in final.committed)
    assert "forward" in text and "ten" in text


async def test_session_through_the_engine_seam() -> None:
    engine = PocketSphinxEngine("embedded", PocketSphinxConfig(workers=1))
    pcm = pcm_of(GOFORWARD)
    updates: list[EngineUpdate] = []
    with trio.fail_after(60):
        async with engine.open_session(SessionOptions()) as session, trio.open_nursery() as n:

            async def send() -> None:
                for i in range(0, len(pcm), 6400):
                    await session.send_audio(pcm[i : i + 6400])
                await session.end_audio()

            n.start_soon(send)
            async for u in session.results():
                updates.append(u)
        assert engine.stats()["sessions"] == 0
    assert "forward" in " ".join(s.text for s in updates[-1].committed)
    await engine.aclose()
