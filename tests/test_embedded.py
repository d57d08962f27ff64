"""The embedded PocketSphinx engine on real recordings."""

from __future__ import annotations

import itertools
from contextlib import aclosing
from pathlib import Path

import httpx
import pocketsphinx
import pytest
import trio
from audio_util import GOFORWARD, LIBRIVOX, SHORT, pcm_of
from conftest import collect, make_config, run_gateway, sse_events

from gateway.config import PocketSphinxConfig
from gateway.engines.base import SessionOptions
from gateway.engines.embedded import (
    PocketSphinxEngine,
    Recognizer,
)
from gateway.errors import UpstreamError, collapse_groups
from gateway.events import EngineUpdate

pytestmark = pytest.mark.anyio

STREAM = "/v1/transcriptions/stream"


@pytest.fixture(scope="module")
def decoder() -> object:
    return pocketsphinx.Decoder(loglevel="FATAL")


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


# --- A session's ending leaves nothing behind (issue 13, 7.1 and 7.2) --------------------------


class _Abort(Exception):
    """What the pipeline raises into a session that fails on its side (a decode error)."""


class _FailingDecoder:
    def __getattr__(self, name: str) -> object:
        raise RuntimeError("injected decoder failure")


async def _run_session(engine: PocketSphinxEngine, pcm: bytes, ending: str = "done") -> str:
    """One session over ``pcm``, ended the way ``ending`` says; the final text when it is done.

    Every other ending happens mid-speech, while the decoder has an utterance open: after the
    first update that shows a tentative text.
    """
    final: EngineUpdate | None = None
    with trio.CancelScope() as scope, collapse_groups():
        async with engine.session(SessionOptions()) as session, trio.open_nursery() as n:

            async def send() -> None:
                for i in range(0, len(pcm), 6400):
                    await session.send_audio(pcm[i : i + 6400])
                await session.end_audio()

            n.start_soon(send)
            async with aclosing(session.results()) as results:
                async for update in results:
                    final = update
                    if ending != "done" and update.tentative:
                        assert session.recognizer.in_utterance  # type: ignore[attr-defined]
                        if ending == "cancel":
                            scope.cancel()
                        elif ending == "error":
                            raise _Abort
                        else:
                            session.recognizer._decoder = _FailingDecoder()
    assert final is not None
    return " ".join(s.text for s in final.committed)


@pytest.mark.parametrize("ending", ["done", "cancel", "error", "decoder_failure"])
async def test_any_session_ending_leaves_the_next_session_as_on_a_fresh_engine(
    ending: str,
) -> None:
    short = pcm_of(SHORT)
    with trio.fail_after(120):
        fresh = PocketSphinxEngine("embedded", PocketSphinxConfig(workers=1))
        expected = await _run_session(fresh, short)
        await fresh.aclose()
        assert expected

        engine = PocketSphinxEngine("embedded", PocketSphinxConfig(workers=1))
        try:
            if ending == "error":
                with pytest.raises(_Abort):
                    await _run_session(engine, pcm_of(LIBRIVOX), ending)
            elif ending == "decoder_failure":
                with pytest.raises(UpstreamError):
                    await _run_session(engine, pcm_of(LIBRIVOX), ending)
            else:
                await _run_session(engine, pcm_of(LIBRIVOX), ending)
            assert engine.stats()["sessions"] == 0
            # The same bytes give the same text, twice: whatever ran before, and each other.
            assert await _run_session(engine, short) == expected
            assert await _run_session(engine, short) == expected
        finally:
            await engine.aclose()


async def test_session_through_the_engine_seam() -> None:
    engine = PocketSphinxEngine("embedded", PocketSphinxConfig(workers=1))
    with trio.fail_after(60):
        text = await _run_session(engine, pcm_of(GOFORWARD))
    assert engine.stats()["sessions"] == 0
    assert "forward" in text
    await engine.aclose()


async def test_an_upload_dropped_mid_stream_changes_nothing_for_the_next_ones(
    tmp_path: Path,
) -> None:
    """Through the gateway, as reported: a client leaves after its first ``transcription`` event;
    the same bytes then transcribe as they did before it, and again after another whole file."""
    config = make_config(tmp_path, engines={"embedded": {"kind": "pocketsphinx", "workers": 1}})

    async def transcribe(c: httpx.AsyncClient, path: Path) -> str:
        files = {"file": (path.name, path.read_bytes(), "audio/wav")}
        async with c.stream("POST", STREAM, files=files, data={"use_cache": "false"}) as r:
            events = await collect(r)
        assert events[-1].event == "done", events[-1]
        text: str = events[-1].data["text"]
        return text

    with trio.fail_after(120):
        async with (
            run_gateway(config) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as c,
        ):
            expected = await transcribe(c, SHORT)
            assert expected
            files = {"file": (LIBRIVOX.name, LIBRIVOX.read_bytes(), "audio/wav")}
            async with (
                c.stream("POST", STREAM, files=files) as r,
                aclosing(sse_events(r)) as events,
            ):
                async for event in events:
                    if event.event == "transcription" and event.data["segments"]:
                        break  # the client leaves mid-speech
            assert await transcribe(c, SHORT) == expected
            await transcribe(c, LIBRIVOX)
            assert await transcribe(c, SHORT) == expected
            assert await transcribe(c, SHORT) == expected
