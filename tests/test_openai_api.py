"""The OpenAI-compatible API end to end: the real ``openai`` SDK (sync in a worker thread, async
under trio) and raw httpx against the real gateway on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import httpx2
import openai
import pytest
import trio
from audio_util import GOFORWARD, write_wav
from conftest import Gateway, make_config, run_gateway
from openai.types.audio import (
    Transcription,
    TranscriptionTextDeltaEvent,
    TranscriptionTextDoneEvent,
    TranscriptionVerbose,
)

from gateway.api.openai_compat import OpenAITranslator, error_response
from gateway.config import Config
from gateway.engines.scripted import ScriptedEngine
from gateway.errors import (
    CapacityExhausted,
    DecodeError,
    GatewayError,
    InternalError,
    NotFound,
    RequestTimeout,
    ShuttingDown,
    TooManyStreams,
    Unauthorized,
    UnknownEngine,
    UpstreamError,
)
from gateway.events import Done, Failed, Progress, Queued, Segment, Transcript

pytestmark = pytest.mark.anyio

ENDPOINT = "/v1/audio/transcriptions"
WORDS = ["alpha", "beta", "gamma", "delta"]
T = TypeVar("T")


def scripted(**kw: object) -> dict[str, object]:
    return {"kind": "scripted", **kw}


def config(
    tmp_path: Path,
    *,
    openai_section: dict[str, object] | None = None,
    server: dict[str, object] | None = None,
    **engines: dict[str, object],
) -> Config:
    """Scripted engines only (the first is the default) unless ``embedded`` is asked for."""
    sections: dict[str, object] = {
        "engines": engines,
        "server": {"default_engine": next(iter(engines)), **(server or {})},
    }
    if openai_section is not None:
        sections["openai"] = openai_section
    return make_config(tmp_path, **sections)


def silence(tmp_path: Path, seconds: float, salt: int = 0) -> Path:
    """A 16 kHz WAV of silence; ``salt`` makes different bytes (so no cache hit) of one length."""
    pcm = bytearray(round(seconds * 16000) * 2)
    pcm[0] = salt
    return write_wav(tmp_path / f"silence-{seconds}-{salt}.wav", bytes(pcm))


@asynccontextmanager
async def async_client(gw: Gateway, **kw: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    kw.setdefault("max_retries", 0)
    async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-test", **kw) as client:
        yield client


async def in_thread(gw: Gateway, fn: Callable[[openai.OpenAI], T], **kw: Any) -> T:
    """Run ``fn`` with a sync client in a worker thread (it blocks); the client timeout bounds it."""
    kw.setdefault("max_retries", 0)

    def run() -> T:
        with openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-test", timeout=30, **kw) as c:
            return fn(c)

    return await trio.to_thread.run_sync(run)


def check_stream(events: list[Any], text: str, seconds: float) -> None:
    """Deltas then exactly one done; the deltas concatenate to the done text."""
    *deltas, done = events
    assert deltas and all(isinstance(e, TranscriptionTextDeltaEvent) for e in deltas)
    assert all(e.type == "transcript.text.delta" and e.delta for e in deltas)
    assert isinstance(done, TranscriptionTextDoneEvent) and done.type == "transcript.text.done"
    assert "".join(e.delta for e in deltas) == done.text == text
    assert done.usage is not None and done.usage.type == "duration"
    assert done.usage.seconds == pytest.approx(seconds, abs=0.01)  # type: ignore[union-attr]


# --- the translator and the error shape, without a server ----------------------------------------


def snapshot(committed: list[str], tentative: list[str] = ()) -> Transcript:  # type: ignore[assignment]
    texts = [*committed, *tentative]
    segments = tuple(Segment(float(i), i + 1.0, t) for i, t in enumerate(texts))
    return Transcript(
        id="x", segments=segments, committed=len(committed), current_time=2.0, total_time=4.0
    )


def frames(raw: bytes | None) -> list[Any]:
    assert raw is not None and raw.endswith(b"\n\n")
    out: list[Any] = []
    for frame in raw.decode().split("\n\n")[:-1]:
        assert frame.startswith("data: ")
        data = frame[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_translator_sends_only_committed_text_and_the_rest_at_done() -> None:
    tr = OpenAITranslator()
    # Tentative text is the engine's guess and may be revised: it never goes into a delta.
    assert tr.encode(Progress(snapshot([], ["alfa"]))) is None
    assert frames(tr.encode(Progress(snapshot(["alpha"], ["bet"])))) == [
        {"type": "transcript.text.delta", "delta": "alpha"}
    ]
    # Nothing newly committed (the tentative tail changed): nothing sent.
    assert tr.encode(Progress(snapshot(["alpha"], ["beta gam"]))) is None
    # Empty segments are skipped; the separating space belongs to the next delta.
    assert frames(tr.encode(Progress(snapshot(["alpha", " ", "beta"])))) == [
        {"type": "transcript.text.delta", "delta": " beta"}
    ]
    # An older (conflated-away or reordered) snapshot resends nothing.
    assert tr.encode(Progress(snapshot(["alpha"]))) is None
    out = frames(tr.encode(Done(snapshot(["alpha", " ", "beta", "gamma", "delta"]), cached=False)))
    assert out == [
        {"type": "transcript.text.delta", "delta": " gamma delta"},
        {
            "type": "transcript.text.done",
            "text": "alpha beta gamma delta",
            "usage": {"type": "duration", "seconds": 4.0},
        },
    ]


def test_translator_queue_positions_are_comments_and_failures_one_error_frame() -> None:
    tr = OpenAITranslator(done_sentinel=True)
    assert tr.encode(Queued(3)) == b": queued 3\n\n"
    assert frames(tr.encode(Failed("UPSTREAM_ERROR", "engine died"))) == [
        {
            "type": "error",
            "error": {
                "message": "engine died",
                "type": "server_error",
                "param": None,
                "code": "upstream_error",
            },
        }
    ]
    # A done with nothing sent before: the whole text in one delta; the sentinel when configured.
    out = frames(OpenAITranslator(done_sentinel=True).encode(Done(snapshot(["a", "b"]), True)))
    assert [f if f == "[DONE]" else f["type"] for f in out] == [
        "transcript.text.delta",
        "transcript.text.done",
        "[DONE]",
    ]
    assert out[0]["delta"] == out[1]["text"] == "a b"
    # No event but the error one carries an "error" key (the SDK raises on any that does).
    assert all("error" not in f for f in out if f != "[DONE]")


@pytest.mark.parametrize(
    ("exc", "status", "type_", "code", "retry", "retry_after"),
    [
        (DecodeError("not audio"), 400, "invalid_request_error", "decode_error", "false", None),
        (Unauthorized("no key"), 401, "authentication_error", "unauthorized", "false", None),
        (UnknownEngine("x"), 404, "invalid_request_error", "model_not_found", "false", None),
        (NotFound("x"), 404, "invalid_request_error", "not_found", "false", None),
        (RequestTimeout("slow"), 408, "invalid_request_error", "request_timeout", "true", None),
        (
            TooManyStreams("busy", retry_after=2.5),
            429,
            "rate_limit_error",
            "too_many_streams",
            "true",
            "3",
        ),
        (
            CapacityExhausted("full", retry_after=5),
            503,
            "server_error",
            "capacity_exhausted",
            "true",
            "5",
        ),
        (ShuttingDown("bye"), 503, "server_error", "shutting_down", "true", None),
        (UpstreamError("died"), 502, "server_error", "upstream_error", "false", None),
        (InternalError("bug"), 500, "server_error", "internal_error", "false", None),
    ],
)
def test_error_response_shape_status_and_retry_headers(
    exc: GatewayError, status: int, type_: str, code: str, retry: str, retry_after: str | None
) -> None:
    response = error_response(exc)
    assert response.status_code == status
    body = json.loads(bytes(response.body))
    assert body == {
        "error": {
            "message": exc.detail,
            "type": type_,
            "param": "model" if isinstance(exc, UnknownEngine) else None,
            "code": code,
        }
    }
    assert response.headers["x-should-retry"] == retry
    assert response.headers.get("retry-after") == retry_after


# --- streaming through the SDK -------------------------------------------------------------------


async def test_stream_with_the_sync_and_the_async_client(tmp_path: Path) -> None:
    cfg = config(tmp_path, fake=scripted(words=WORDS, seconds_per_word=0.5, delay=0.01))
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw:
            audio = silence(tmp_path, 2.0, salt=1)

            def sync_stream(c: openai.OpenAI) -> list[Any]:
                stream = c.audio.transcriptions.create(file=audio, model="fake", stream=True)
                assert isinstance(stream, openai.Stream)
                return list(stream)

            sync_events = await in_thread(gw, sync_stream)
            async with async_client(gw) as c:
                stream = await c.audio.transcriptions.create(
                    file=silence(tmp_path, 2.0, salt=2), model="fake", stream=True
                )
                assert isinstance(stream, openai.AsyncStream)
                async_events = [e async for e in stream]
            engine = gw.state.engines["fake"]
            assert isinstance(engine, ScriptedEngine) and engine.opened == 2
    check_stream(sync_events, "alpha beta gamma delta", 2.0)
    check_stream(async_events, "alpha beta gamma delta", 2.0)


async def test_cache_hit_streams_like_a_fresh_result(tmp_path: Path) -> None:
    cfg = config(tmp_path, fake=scripted(words=WORDS, seconds_per_word=0.5))
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw, async_client(gw) as c:
            audio = silence(tmp_path, 2.0)
            first = [
                e
                async for e in await c.audio.transcriptions.create(
                    file=audio, model="fake", stream=True
                )
            ]
            again = [
                e
                async for e in await c.audio.transcriptions.create(
                    file=audio, model="fake", stream=True
                )
            ]
            # Another language is another transcription, not the cached one.
            other = await c.audio.transcriptions.create(file=audio, model="fake", language="de")
            engine = gw.state.engines["fake"]
            assert isinstance(engine, ScriptedEngine) and engine.opened == 2
    check_stream(first, "alpha beta gamma delta", 2.0)
    check_stream(again, "alpha beta gamma delta", 2.0)
    assert len(again) == 2  # the whole text at once, then done
    assert other.text == "alpha beta gamma delta"


async def test_stream_mid_stream_failure_raises_api_error_while_iterating(tmp_path: Path) -> None:
    cfg = config(tmp_path, bad=scripted(words=WORDS, seconds_per_word=0.5, fail_after=2))
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw, async_client(gw) as c:
            stream = await c.audio.transcriptions.create(
                file=silence(tmp_path, 2.0), model="bad", stream=True
            )
            got: list[Any] = []
            with pytest.raises(openai.APIError) as info:
                async for event in stream:
                    got.append(event)
            engine = gw.state.engines["bad"]
            assert isinstance(engine, ScriptedEngine)
            await engine.wait_closed(1)
    assert not isinstance(info.value, openai.APIStatusError)  # raised inside a 200 stream
    assert info.value.message == "scripted failure"
    assert info.value.body == {
        "message": "scripted failure",
        "type": "server_error",
        "param": None,
        "code": "upstream_error",
    }
    assert all(isinstance(e, TranscriptionTextDeltaEvent) for e in got)


async def test_client_closing_mid_stream_cancels_the_engine_session(tmp_path: Path) -> None:
    cfg = config(tmp_path, slow=scripted(words=WORDS * 30, seconds_per_word=0.5, delay=0.05))
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw, async_client(gw) as c:
            engine = gw.state.engines["slow"]
            assert isinstance(engine, ScriptedEngine)
            stream = await c.audio.transcriptions.create(
                file=silence(tmp_path, 60.0), model="slow", stream=True
            )
            # anext on the stream itself: breaking out of `async for` leaves the SDK's __aiter__
            # wrapper generator to the GC, which trio reports as a ResourceWarning.
            first = await anext(stream)
            assert isinstance(first, TranscriptionTextDeltaEvent) and first.delta == "alpha"
            assert engine.active == 1
            await stream.close()
            with trio.fail_after(5):
                await engine.wait_closed(1)
            assert engine.active == 0

            # The sync client: stop iterating and close.
            def first_then_close(client: openai.OpenAI) -> Any:
                with client.audio.transcriptions.create(
                    file=silence(tmp_path, 60.0, salt=1), model="slow", stream=True
                ) as s:
                    return next(iter(s))

            assert (await in_thread(gw, first_then_close)).delta == "alpha"
            with trio.fail_after(5):
                await engine.wait_closed(2)
            assert engine.active == 0 and engine.opened == 2


async def test_keepalive_comments_do_not_disturb_the_sdk(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        server={"keepalive": 0.05},
        slow=scripted(words=["slow", "words"], seconds_per_word=1.0, delay=0.3),
    )
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as raw:
                body = (
                    await raw.post(
                        ENDPOINT,
                        data={"model": "slow", "stream": "true"},
                        files={"file": ("a.wav", silence(tmp_path, 2.0, salt=1).read_bytes())},
                    )
                ).text
            async with async_client(gw) as c:
                stream = await c.audio.transcriptions.create(
                    file=silence(tmp_path, 2.0, salt=2), model="slow", stream=True
                )
                events = [e async for e in stream]
    # Updates come 0.3 s apart: keepalive comments (every 50 ms of silence) fill the gaps.
    assert body.startswith(": keepalive\n\n") and body.count(": keepalive\n\n") >= 3
    check_stream(events, "slow words", 2.0)


# --- non-stream response formats -----------------------------------------------------------------


async def test_every_response_format(tmp_path: Path) -> None:
    cfg = config(tmp_path, fake=scripted(words=["alpha", "beta"], seconds_per_word=1.5))
    audio = silence(tmp_path, 3.0)
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw:

            def formats(c: openai.OpenAI) -> dict[str, Any]:
                create = c.audio.transcriptions.create
                return {
                    # prompt and temperature are accepted (and ignored).
                    "json": create(file=audio, model="fake", prompt="greek", temperature=0.2),
                    "text": create(file=audio, model="fake", response_format="text"),
                    "srt": create(file=audio, model="fake", response_format="srt"),
                    "vtt": create(file=audio, model="fake", response_format="vtt"),
                    "verbose_json": create(
                        file=audio, model="fake", response_format="verbose_json", language="el"
                    ),
                    "verbose_words": create(
                        file=audio,
                        model="fake",
                        response_format="verbose_json",
                        timestamp_granularities=["word", "segment"],
                    ),
                }

            got = await in_thread(gw, formats)
            async with async_client(gw) as c:
                raw = await c.audio.transcriptions.with_raw_response.create(
                    file=audio, model="fake", response_format="vtt"
                )
    j = got["json"]
    assert isinstance(j, Transcription) and j.text == "alpha beta"
    assert j.usage is not None and j.usage.type == "duration" and j.usage.seconds == 3.0
    assert got["text"] == "alpha beta\n"
    assert got["srt"] == (
        "1\n00:00:00,000 --> 00:00:01,500\nalpha\n\n2\n00:00:01,500 --> 00:00:03,000\nbeta\n\n"
    )
    assert got["vtt"] == (
        "WEBVTT\n\n1\n00:00:00.000 --> 00:00:01.500\nalpha\n\n"
        "2\n00:00:01.500 --> 00:00:03.000\nbeta\n\n"
    )
    assert raw.headers["content-type"] == "text/vtt; charset=utf-8"
    v = got["verbose_json"]
    assert isinstance(v, TranscriptionVerbose)
    assert (v.text, v.language, v.duration) == ("alpha beta", "el", 3.0)
    assert v.usage is not None and v.usage.seconds == 3.0
    assert v.model_extra == {"task": "transcribe"}
    assert v.segments is not None
    assert [(s.id, s.start, s.end, s.text, s.tokens) for s in v.segments] == [
        (0, 0.0, 1.5, "alpha", []),
        (1, 1.5, 3.0, "beta", []),
    ]
    assert [s.seek for s in v.segments] == [0, 150]
    assert v.words is None
    # Words were asked for, but the scripted engine gives no word times: no "words" key at all.
    assert got["verbose_words"].words is None
    assert "words" not in got["verbose_words"].model_fields_set


async def test_embedded_engine_real_audio_through_the_whisper_alias(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)  # the embedded PocketSphinx engine, the default
    with trio.fail_after(120):
        async with run_gateway(cfg) as gw, async_client(gw) as c:
            stream = await c.audio.transcriptions.create(
                file=GOFORWARD, model="whisper-1", stream=True
            )
            events = [e async for e in stream]
            verbose = await c.audio.transcriptions.create(
                file=GOFORWARD,
                model="whisper-1",
                response_format="verbose_json",
                timestamp_granularities=["word"],
            )
            plain = await c.audio.transcriptions.create(
                file=GOFORWARD, model="embedded", response_format="verbose_json"
            )
    check_stream(events, verbose.text, 2.79)
    assert "forward" in verbose.text
    assert verbose.duration == pytest.approx(2.79, abs=0.01)
    assert verbose.words is not None
    words = [w.word for w in verbose.words]
    assert "forward" in words and " ".join(words) == verbose.text
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts) and all(w.end > w.start for w in verbose.words)
    assert plain.text == verbose.text and plain.words is None


# --- models and errors ---------------------------------------------------------------------------


async def test_models_list_retrieve_and_aliases(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        openai_section={"aliases": {"whisper-1": "", "gpt-4o-transcribe": "other"}},
        fake=scripted(words=["from", "fake"]),
        other=scripted(words=["from", "other"]),
    )
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw, async_client(gw) as c:
            page = await c.models.list()
            model = await c.models.retrieve("gpt-4o-transcribe")
            with pytest.raises(openai.NotFoundError) as missing:
                await c.models.retrieve("gpt-5-transcribe")
            audio = silence(tmp_path, 2.0)
            default = await c.audio.transcriptions.create(file=audio, model="whisper-1")
            aliased = await c.audio.transcriptions.create(file=audio, model="gpt-4o-transcribe")
    assert page.object == "list"
    assert [m.id for m in page.data] == ["fake", "other", "whisper-1", "gpt-4o-transcribe"]
    assert all(m.object == "model" and m.owned_by == "asr-gateway" for m in page.data)
    # Each model names the engine it runs on: an alias of "" runs on the default engine.
    assert [getattr(m, "root", None) for m in page.data] == ["fake", "other", "fake", "other"]
    assert model.id == "gpt-4o-transcribe"
    assert missing.value.code == "model_not_found"
    assert default.text == "from fake" and aliased.text == "from other"


async def test_request_errors_map_to_the_sdk_classes(tmp_path: Path) -> None:
    cfg = config(tmp_path, fake=scripted())
    audio = silence(tmp_path, 1.0)
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw, async_client(gw, max_retries=2) as c:
            create = c.audio.transcriptions.create
            with pytest.raises(openai.NotFoundError) as unknown:
                await create(file=audio, model="gpt-9", stream=True)
            with pytest.raises(openai.BadRequestError) as fmt:
                await create(file=audio, model="fake", response_format="xml")  # type: ignore[arg-type]
            with pytest.raises(openai.BadRequestError) as gran:
                await create(
                    file=audio,
                    model="fake",
                    response_format="verbose_json",
                    timestamp_granularities=["char"],  # type: ignore[list-item]
                )
            with pytest.raises(openai.BadRequestError) as empty:
                await create(file=("empty.wav", b"", "audio/wav"), model="fake")
            with pytest.raises(openai.BadRequestError) as garbage:
                await create(
                    file=("noise.wav", b"RIFF" + bytes(range(256)) * 40, "audio/wav"), model="fake"
                )
            engine = gw.state.engines["fake"]
            assert isinstance(engine, ScriptedEngine) and engine.opened == 0
    expected = [
        (unknown, "model_not_found", "model"),
        (fmt, "invalid_option", "response_format"),
        (gran, "invalid_option", "timestamp_granularities"),
        (empty, "empty_file", None),
        (garbage, "decode_error", None),
    ]
    for info, code, param in expected:
        err = info.value
        assert (err.code, err.param, err.type) == (code, param, "invalid_request_error")
        assert err.response.headers["x-should-retry"] == "false"
        # 4xx: the SDK sent exactly one request.
        assert err.response.request.headers["x-stainless-retry-count"] == "0"
    assert "gpt-9" in unknown.value.message


async def test_permanent_failure_is_not_retried(tmp_path: Path) -> None:
    cfg = config(tmp_path, bad=scripted(fail_after=0))
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw, async_client(gw, max_retries=2) as c:
            with pytest.raises(openai.InternalServerError) as info:
                await c.audio.transcriptions.create(file=silence(tmp_path, 1.0), model="bad")
            engine = gw.state.engines["bad"]
            assert isinstance(engine, ScriptedEngine)
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    assert info.value.response.headers["x-should-retry"] == "false"
    # The engine already spent its own attempts: the SDK, allowed 2 retries, sent one request.
    assert engine.opened == 1


async def test_capacity_503_with_retry_after_is_retried_when_allowed(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        one=scripted(
            words=["x", "y"], seconds_per_word=1.0, delay=0.1, max_sessions=1, max_queue=0
        ),
    )
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as raw:
            engine = gw.state.engines["one"]
            assert isinstance(engine, ScriptedEngine)
            # A long stream holds the only session.
            async with (
                raw.stream(
                    "POST",
                    ENDPOINT,
                    data={"model": "one", "stream": "true"},
                    files={"file": ("long.wav", silence(tmp_path, 120.0).read_bytes())},
                ) as blocker,
                aclosing(blocker.aiter_lines()) as lines,
            ):
                assert blocker.status_code == 200
                assert (await anext(lines)).startswith("data: ")
                assert engine.active == 1
                async with async_client(gw) as c:
                    with pytest.raises(openai.InternalServerError) as refused:
                        await c.audio.transcriptions.create(
                            file=silence(tmp_path, 1.0), model="one"
                        )
                refused_503 = trio.Event()

                async def on_response(response: httpx2.Response) -> None:
                    if response.status_code == 503:
                        refused_503.set()

                http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [on_response]})
                async with async_client(gw, max_retries=1, http_client=http) as c:
                    result: list[Any] = []

                    async def transcribe() -> None:
                        result.append(
                            await c.audio.transcriptions.with_raw_response.create(
                                file=silence(tmp_path, 2.0), model="one"
                            )
                        )

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(transcribe)
                        await refused_503.wait()
                        # Free the session: the SDK retries after Retry-After and gets it.
                        await blocker.aclose()
    err = refused.value
    assert err.status_code == 503 and err.code == "capacity_exhausted"
    assert err.response.headers["retry-after"] == "5"
    assert err.response.headers["x-should-retry"] == "true"
    assert result[0].retries_taken == 1
    assert result[0].parse().text == "x y"
    assert engine.opened == 2  # the blocker and the retried request


# --- curl-style raw multipart --------------------------------------------------------------------


def raw_frames(body: str) -> list[str]:
    assert body.endswith("\n\n")
    return body.split("\n\n")[:-1]


@pytest.mark.parametrize("sentinel", [False, True])
async def test_curl_style_multipart_and_raw_frames(tmp_path: Path, sentinel: bool) -> None:
    cfg = config(
        tmp_path,
        openai_section={"done_sentinel": sentinel},
        fake=scripted(words=WORDS, seconds_per_word=0.5),
    )
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            fields = {
                "model": "fake",
                "language": "en",
                "include[]": ["logprobs"],
                "timestamp_granularities[]": ["word", "segment"],
            }
            responses = []
            for i, flag in enumerate(["true", "1", "TRUE"]):
                audio = silence(tmp_path, 2.0, salt=i).read_bytes()
                responses.append(
                    await c.post(
                        ENDPOINT,
                        data={**fields, "stream": flag},
                        files={"file": ("a.wav", audio, "audio/wav")},
                        # The SDK sends this even when streaming: no content negotiation.
                        headers={"accept": "application/json"},
                    )
                )
            not_streamed = await c.post(
                ENDPOINT,
                data={**fields, "stream": "false"},
                files={"file": ("a.wav", silence(tmp_path, 2.0, salt=0).read_bytes())},
            )
            bad = await c.post(
                ENDPOINT,
                data={**fields, "stream": "maybe"},
                files={"file": ("a.wav", silence(tmp_path, 2.0, salt=0).read_bytes())},
            )
            no_model = await c.post(
                ENDPOINT, files={"file": ("a.wav", silence(tmp_path, 2.0).read_bytes())}
            )
    for r in responses:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        frames_ = raw_frames(r.text)
        assert all(f.startswith("data: ") and "\n" not in f for f in frames_)
        payloads = [f[len("data: ") :] for f in frames_]
        if sentinel:
            assert payloads[-1] == "[DONE]"
            payloads = payloads[:-1]
        assert "[DONE]" not in payloads
        events = [json.loads(p) for p in payloads]
        assert [e["type"] for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
        assert events[-1] == {
            "type": "transcript.text.done",
            "text": "alpha beta gamma delta",
            "usage": {"type": "duration", "seconds": 2.0},
        }
        assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"]
    assert not_streamed.status_code == 200
    assert not_streamed.json() == {
        "text": "alpha beta gamma delta",
        "usage": {"type": "duration", "seconds": 2.0},
    }
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "stream"
    assert no_model.status_code == 400
    assert no_model.json()["error"] == {
        "message": "you must provide a model parameter",
        "type": "invalid_request_error",
        "param": "model",
        "code": "invalid_option",
    }


async def test_queue_positions_are_sse_comments(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        one=scripted(words=["x", "y"], seconds_per_word=1.0, delay=0.1, max_sessions=1),
    )
    with trio.fail_after(60):
        async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as raw:
            engine = gw.state.engines["one"]
            assert isinstance(engine, ScriptedEngine)
            async with (
                raw.stream(
                    "POST",
                    ENDPOINT,
                    data={"model": "one", "stream": "true"},
                    files={"file": ("long.wav", silence(tmp_path, 120.0).read_bytes())},
                ) as blocker,
                aclosing(blocker.aiter_lines()) as blocker_lines,
            ):
                assert (await anext(blocker_lines)).startswith("data: ")
                async with raw.stream(
                    "POST",
                    ENDPOINT,
                    data={"model": "one", "stream": "true"},
                    files={"file": ("a.wav", silence(tmp_path, 2.0).read_bytes())},
                ) as queued:
                    async with aclosing(queued.aiter_text()) as text:
                        # Queued behind the blocker (nothing else can come before it is freed):
                        # a comment, which SSE clients ignore, and no invented event type.
                        assert await anext(text) == ": queued 1\n\n"
                        await blocker.aclose()
                        rest = "".join([t async for t in text])
    # Then the stream as usual (SSE comments are ignored by the SDK: see the keepalive test).
    events = [json.loads(f[len("data: ") :]) for f in raw_frames(rest)]
    assert [e["type"] for e in events][-1] == "transcript.text.done"
    assert "".join(e.get("delta", "") for e in events) == events[-1]["text"] == "x y"


async def test_unknown_paths_and_methods_are_openai_errors(tmp_path: Path) -> None:
    cfg = config(tmp_path, fake=scripted())
    with trio.fail_after(30):
        async with run_gateway(cfg) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as c:
                missing = await c.get("/v1/audio/translations/x")
                wrong = await c.get(ENDPOINT)
                models = await c.delete("/v1/models")

            def sdk(c: openai.OpenAI) -> openai.APIStatusError:
                try:
                    c.get("/audio/speech", cast_to=httpx.Response)
                except openai.APIStatusError as exc:
                    return exc
                raise AssertionError("no error")

            via_sdk = await in_thread(gw, sdk)
    assert missing.status_code == 404 and missing.json()["error"] == {
        "message": "no route matches this path",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
    for r in (wrong, models):
        assert r.status_code == 405 and r.headers["x-should-retry"] == "false"
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert wrong.headers["allow"] == "POST"
    assert isinstance(via_sdk, openai.NotFoundError) and via_sdk.code == "not_found"
