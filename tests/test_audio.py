"""Spooling uploads and decoding every supported container with PyAV."""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import trio
from audio_util import (
    FORMATS,
    GOFORWARD,
    LIBRIVOX,
    chained_ogg,
    mixed_rate_mp3,
    patched_wav,
    pcm_of,
    transcode,
    truncated,
    two_audio_streams,
    with_video,
    write_wav,
)
from conftest import collect, make_config, run_gateway

from gateway import audio as audio_module
from gateway.audio import PcmDecoder, open_decoder, receive_upload
from gateway.errors import BadRequest, DecodeError, MissingFile, PayloadTooLarge

pytestmark = pytest.mark.anyio


async def chunks(data: bytes, size: int = 1000) -> AsyncGenerator[bytes, None]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def multipart(fields: dict[str, str], file: bytes, name: str = "file") -> tuple[str, bytes]:
    b = "XyZbOuNdArY"
    parts = [
        f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{b}\r\nContent-Disposition: form-data; name="{name}"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\n".encode()
        + file
        + b"\r\n"
    )
    return f"multipart/form-data; boundary={b}", b"".join(parts) + f"--{b}--\r\n".encode()


async def test_multipart_spool_hashes_incrementally_and_keeps_fields(tmp_path: Path) -> None:
    audio = GOFORWARD.read_bytes() * 3  # > one spool batch, split across many network chunks
    ctype, body = multipart({"engine": "x", "language": "en"}, audio)
    upload = await receive_upload(
        ctype, len(body), chunks(body, 777), max_bytes=10**7, spool_dir=str(tmp_path)
    )
    try:
        assert Path(upload.path).read_bytes() == audio
        assert upload.id == hashlib.blake2b(audio, digest_size=16).hexdigest()
        assert upload.field("engine") == "x" and upload.field("language") == "en"
        assert upload.filename == "a.wav" and upload.content_type == "audio/wav"
    finally:
        await upload.aclose()
    assert not Path(upload.path or "/nonexistent").exists()
    assert list(tmp_path.iterdir()) == []


async def test_limit_is_enforced_while_receiving_and_the_spool_is_removed(tmp_path: Path) -> None:
    consumed = 0

    async def endless() -> AsyncGenerator[bytes, None]:
        nonlocal consumed
        while True:
            consumed += 4096
            yield b"\0" * 4096

    with pytest.raises(PayloadTooLarge):
        await receive_upload(
            "audio/wav", None, endless(), max_bytes=100_000, spool_dir=str(tmp_path)
        )
    assert consumed <= 100_000 + 4096
    assert list(tmp_path.iterdir()) == []


async def test_missing_field_and_malformed_multipart(tmp_path: Path) -> None:
    ctype, body = multipart({}, b"abc", name="upload")
    with pytest.raises(MissingFile):
        await receive_upload(ctype, None, chunks(body), max_bytes=10**6, spool_dir=str(tmp_path))
    with pytest.raises(BadRequest):
        await receive_upload(
            "multipart/form-data", None, chunks(body), max_bytes=10**6, spool_dir=str(tmp_path)
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_container_decodes_to_16k_mono(tmp_path: Path, fmt: str) -> None:
    path = transcode(GOFORWARD, tmp_path / ("x" + FORMATS[fmt][3]), fmt)
    decoder = open_decoder(str(path))
    try:
        assert decoder.duration == pytest.approx(2.786, abs=0.02)
        pcm = bytearray()
        while chunk := decoder.read(5000):
            assert len(chunk) % 2 == 0 and len(chunk) <= 5000
            pcm += chunk
    finally:
        decoder.close()
    assert len(pcm) / 32000 == pytest.approx(2.786, abs=0.03)
    if fmt == "wav":
        assert bytes(pcm) == pcm_of(GOFORWARD)


@pytest.mark.parametrize(
    "content", [b"\x00" * 5000, b"just some text, not audio" * 100, b"RIFF$\x00\x00\x00WAVEfmt "]
)
def test_undecodable_bytes_are_a_decode_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(DecodeError) as info:
        open_decoder(str(path))
    assert str(tmp_path) not in info.value.detail


def test_decoder_reads_in_bounded_steps(tmp_path: Path) -> None:
    decoder = PcmDecoder(str(GOFORWARD))
    try:
        sizes = []
        while chunk := decoder.read(3200):
            sizes.append(len(chunk))
        assert max(sizes) == 3200 and sum(sizes) == len(pcm_of(GOFORWARD))
    finally:
        decoder.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_decoder_holds_the_file_only_while_decoding(tmp_path: Path, fmt: str) -> None:
    path = str(transcode(GOFORWARD, tmp_path / ("x" + FORMATS[fmt][3]), fmt))
    whole = bytearray()
    reference = open_decoder(path)
    while chunk := reference.read(4000):
        whole += chunk
    before = _open_fds()
    decoder = open_decoder(path)
    try:
        assert _open_fds() == before + 1
        # Suspended while queued: no descriptor; then it starts again from the beginning.
        decoder.suspend()
        assert _open_fds() == before
        pcm = bytearray(decoder.read(4000))
        assert _open_fds() == before + 1
        while chunk := decoder.read(4000):
            pcm += chunk
        # The end of the audio releases the file before close().
        assert _open_fds() == before
    finally:
        decoder.close()
    assert bytes(pcm) == bytes(whole) and len(whole) > 80_000


def test_a_file_probed_to_its_end_decodes_again_after_suspend(tmp_path: Path) -> None:
    # 50 ms: the probe reads the whole file, so the decoder is at its end before the first read.
    path = write_wav(tmp_path / "tiny.wav", pcm_of(GOFORWARD)[:1600])
    decoder = open_decoder(str(path))
    try:
        decoder.suspend()
        pcm = bytearray()
        while chunk := decoder.read(4000):
            pcm += chunk
    finally:
        decoder.close()
    assert bytes(pcm) == pcm_of(GOFORWARD)[:1600]


def test_mp3_behind_a_large_id3_tag_decodes(tmp_path: Path) -> None:
    mp3 = transcode(GOFORWARD, tmp_path / "x.mp3", "mp3").read_bytes()
    # An ID3v2.3 tag with a 300 KiB picture frame: far past the fast first probe.
    picture = b"\x00image/png\x00\x03\x00" + bytes(300 * 1024)
    frame = b"APIC" + len(picture).to_bytes(4, "big") + b"\x00\x00" + picture
    size = len(frame)
    synchsafe = bytes((size >> shift) & 0x7F for shift in (21, 14, 7, 0))
    path = tmp_path / "tagged.mp3"
    path.write_bytes(b"ID3\x03\x00\x00" + synchsafe + frame + mp3)
    decoder = open_decoder(str(path))
    try:
        assert decoder.duration == pytest.approx(2.786, abs=0.05)
        total = 0
        while chunk := decoder.read(32000):
            total += len(chunk)
    finally:
        decoder.close()
    assert total / 32000 == pytest.approx(2.786, abs=0.03)


def test_a_file_the_fast_probe_cannot_read_is_opened_with_the_full_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = av.open
    calls: list[bool] = []

    def fast_probe_fails(*args: Any, **kwargs: Any) -> Any:
        fast = "probesize" in kwargs.get("container_options", {})
        calls.append(fast)
        if fast:
            raise av.InvalidDataError(1094995529, "Invalid data found when processing input")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", fast_probe_fails)
    decoder = open_decoder(str(GOFORWARD))
    try:
        pcm = bytearray()
        while chunk := decoder.read(32000):
            pcm += chunk
    finally:
        decoder.close()
    assert calls == [True, False]
    assert bytes(pcm) == pcm_of(GOFORWARD)


# --- Odd and damaged files (issue 13: 7.3, 7.6, 7.9) ------------------------------------------


def _decode_all(path: Path) -> tuple[PcmDecoder, bytes]:
    decoder = open_decoder(str(path))
    pcm = bytearray()
    try:
        while chunk := decoder.read(32000):
            pcm += chunk
    finally:
        decoder.close()
    return decoder, bytes(pcm)


@pytest.mark.parametrize(("tag", "bits"), [(0x1234, 16), (3, 16)])
def test_a_codec_ffmpeg_has_no_decoder_for_is_a_decode_error(
    tmp_path: Path, tag: int, bits: int
) -> None:
    # An unknown format tag, and float samples of 16 bits: FFmpeg reads the WAV, has no decoder.
    path = patched_wav(GOFORWARD, tmp_path / "patched.wav", tag, bits)
    with pytest.raises(DecodeError, match="no decoder"):
        open_decoder(str(path))


GOFORWARD_SECONDS = len(pcm_of(GOFORWARD)) / 32000
LIBRIVOX_SECONDS = len(pcm_of(LIBRIVOX)) / 32000


@pytest.mark.parametrize(
    ("make", "header"),
    [
        # 10 s of video, 2.79 s of audio: the container says 10 s, the audio track 2.79 s.
        (lambda p: with_video(GOFORWARD, p / "v.webm", 10.0), GOFORWARD_SECONDS),
        # Muxed to a pipe: no track lengths at all, so none is claimed before decoding.
        (lambda p: with_video(GOFORWARD, p / "v.webm", 10.0, seekable=False), None),
        # The first audio stream is the one decoded; the second is 9 times as long.
        (lambda p: two_audio_streams(GOFORWARD, LIBRIVOX, p / "two.mkv"), GOFORWARD_SECONDS),
    ],
    ids=["webm-with-longer-video", "webm-without-lengths", "two-audio-streams"],
)
def test_the_duration_is_the_decoded_audio_streams(
    tmp_path: Path, make: Callable[[Path], Path], header: float | None
) -> None:
    decoder, pcm = _decode_all(make(tmp_path))
    if header is None:
        assert decoder.duration is None
    else:
        assert decoder.duration == pytest.approx(header, abs=0.02)
    assert len(pcm) / 32000 == pytest.approx(GOFORWARD_SECONDS, abs=0.02)
    assert decoder.seconds == len(pcm) / 32000
    assert decoder.errors == 0


@pytest.mark.parametrize(
    ("make", "seconds"),
    [
        # Three links: vorbis 44.1 kHz stereo, opus 48 kHz mono, vorbis 22.05 kHz stereo.
        (lambda p: chained_ogg(GOFORWARD, p / "chained.ogg"), 3 * GOFORWARD_SECONDS),
        # 44.1 kHz frames, then 22.05 kHz frames; the first of those fails to decode.
        (lambda p: mixed_rate_mp3(GOFORWARD, p / "mixed.mp3"), 2 * GOFORWARD_SECONDS),
        # Cut mid-frame at 90 % of its bytes: all but the last frame decode.
        (lambda p: truncated(LIBRIVOX, p / "cut.flac", "flac", 0.9), 0.9 * LIBRIVOX_SECONDS),
    ],
    ids=["chained-ogg", "mixed-rate-mp3", "truncated-flac"],
)
def test_damaged_files_decode_past_the_bad_part_and_count_it(
    tmp_path: Path, make: Callable[[Path], Path], seconds: float
) -> None:
    decoder, pcm = _decode_all(make(tmp_path))
    assert len(pcm) / 32000 == pytest.approx(seconds, rel=0.02, abs=0.1)
    assert decoder.seconds == len(pcm) / 32000
    assert decoder.errors >= 1


def test_each_link_of_a_chained_ogg_is_the_recording(tmp_path: Path) -> None:
    # Every link decodes whole and in order: each third has the recording's loudness envelope.
    _, pcm = _decode_all(chained_ogg(GOFORWARD, tmp_path / "chained.ogg"))
    reference = _envelope(pcm_of(GOFORWARD))
    third = len(pcm) // 3 & ~1
    for i in range(3):
        envelope = _envelope(pcm[i * third : (i + 1) * third])
        n = min(len(envelope), len(reference))
        assert np.corrcoef(envelope[:n], reference[:n])[0, 1] > 0.9


def _envelope(pcm: bytes) -> Any:
    """Mean absolute amplitude per 50 ms."""
    samples = np.abs(np.frombuffer(pcm, dtype="<i2").astype(np.float64))
    blocks = len(samples) // 800
    return samples[: blocks * 800].reshape(blocks, 800).mean(axis=1)


def test_a_file_whose_every_frame_is_damaged_is_a_decode_error(tmp_path: Path) -> None:
    # A whole FLAC header (so the format is recognised), then frames of garbage.
    flac = transcode(LIBRIVOX, tmp_path / "x.flac", "flac").read_bytes()
    path = tmp_path / "garbage.flac"
    path.write_bytes(flac[:8300] + random.Random(7).randbytes(100_000))
    with pytest.raises(DecodeError, match="no audio could be decoded"):
        open_decoder(str(path))


# --- Through the gateway --------------------------------------------------------------------


def _scripted_config(tmp_path: Path) -> Any:
    # The default engine, so that every front API's default model or profile reaches it.
    words = [f"w{i}" for i in range(60)]
    engine = {"kind": "scripted", "words": words, "seconds_per_word": 0.25}
    return make_config(tmp_path, engines={"embedded": engine})


def _files(path: Path) -> dict[str, tuple[str, bytes, str]]:
    return {"file": (path.name, path.read_bytes(), "application/octet-stream")}


UPLOAD_ROUTES = [
    ("/v1/transcriptions/stream", 415),
    ("/v1/transcriptions", 415),
    ("/v1/audio/transcriptions", 400),
    ("/asr/transcribe/stream", 415),
    ("/asr/transcribe", 415),
]


async def test_audio_with_no_decoder_is_a_coded_415_on_every_upload_route(
    tmp_path: Path,
) -> None:
    unknown = patched_wav(GOFORWARD, tmp_path / "unknown.wav", 0x1234, 16)
    float16 = patched_wav(GOFORWARD, tmp_path / "float16.wav", 3, 16)
    with trio.fail_after(30):
        async with (
            run_gateway(_scripted_config(tmp_path)) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
        ):
            for path in (unknown, float16):
                for route, status in UPLOAD_ROUTES:
                    r = await c.post(route, files=_files(path), data={"model": "whisper-1"})
                    assert r.status_code == status, (route, r.text)
                    body = r.json()
                    code = body["error"]["code"] if "error" in body else body["code"]
                    assert code.upper() == "DECODE_ERROR", (route, body)


async def test_times_usage_store_and_metric_take_the_decoded_audios_length(
    tmp_path: Path,
) -> None:
    # 10 s of video around 2.79 s of audio; muxed to a pipe, so no track says its length.
    webm = with_video(GOFORWARD, tmp_path / "video.webm", 10.0, seekable=False)
    with trio.fail_after(30):
        async with (
            run_gateway(_scripted_config(tmp_path)) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
        ):
            # The counter is process-wide: earlier tests may have counted "embedded" audio too.
            before = _audio_seconds((await c.get("/metrics")).text)
            async with c.stream("POST", "/v1/transcriptions/stream", files=_files(webm)) as r:
                events = await collect(r)
            done = events[-1]
            assert done.event == "done", done
            assert done.data["total_time"] == pytest.approx(GOFORWARD_SECONDS, abs=0.01)
            assert done.data["current_time"] == done.data["total_time"]
            assert "audio_errors" not in done.data
            # Unknown until the decoder reached the end of the audio, then the decoded length.
            for event in events[:-1]:
                assert event.data["total_time"] in (None, done.data["total_time"])
                assert event.data["current_time"] <= done.data["total_time"]
            stored = (await c.get(f"/v1/transcriptions/{done.data['id']}")).json()
            assert stored["total_time"] == done.data["total_time"]
            r = await c.post(
                "/v1/audio/transcriptions", files=_files(webm), data={"model": "whisper-1"}
            )
            assert r.json()["usage"]["seconds"] == pytest.approx(GOFORWARD_SECONDS, abs=0.01)
            after = _audio_seconds((await c.get("/metrics")).text)
    # Counted once: the OpenAI request was a cache hit.
    assert after - before == pytest.approx(GOFORWARD_SECONDS, abs=0.01)


def _audio_seconds(metrics: str) -> float:
    prefix = 'gateway_audio_seconds_total{engine="embedded",replica='
    counted = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(counted[0].split()[-1]) if counted else 0.0


async def test_a_damaged_file_is_transcribed_past_its_errors_and_done_says_so(
    tmp_path: Path,
) -> None:
    chained = chained_ogg(GOFORWARD, tmp_path / "chained.ogg")
    seconds = 3 * GOFORWARD_SECONDS
    nocache = {"use_cache": "false"}
    with trio.fail_after(30):
        async with (
            run_gateway(_scripted_config(tmp_path)) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
        ):
            # First: the OpenAI route has no use_cache, and a cache hit reports no audio errors.
            route = "/v1/audio/transcriptions"
            form = {"model": "whisper-1", "stream": "true"}
            async with c.stream("POST", route, files=_files(chained), data=form) as r:
                openai = [e for e in await collect(r) if e.event == "message"][-1]
            route = "/v1/transcriptions/stream"
            async with c.stream("POST", route, files=_files(chained), data=nocache) as r:
                native = (await collect(r))[-1]
            route = "/asr/transcribe/stream"
            async with c.stream("POST", route, files=_files(chained), params=nocache) as r:
                aymurai = (await collect(r))[-1]
    assert native.event == "done", native
    assert native.data["audio_errors"] >= 1
    # The whole of every link was transcribed: one scripted word per 0.25 s of audio.
    assert native.data["total_time"] == pytest.approx(seconds, rel=0.02)
    assert len(native.data["text"].split()) == math.ceil(native.data["total_time"] / 0.25)
    assert openai.data["type"] == "transcript.text.done"
    assert openai.data["audio_errors"] == native.data["audio_errors"]
    assert openai.data["usage"]["seconds"] == native.data["total_time"]
    assert aymurai.event == "done", aymurai
    assert aymurai.data["audio_errors"] == native.data["audio_errors"]


def test_past_too_many_damaged_packets_in_a_row_the_rest_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The mixed-rate MP3 has one bad packet where the rates change: with a limit of one bad
    # packet in a row, only the first half decodes; garbage is not read to its end.
    path = mixed_rate_mp3(GOFORWARD, tmp_path / "mixed.mp3")
    monkeypatch.setattr(audio_module, "MAX_BAD_PACKETS_IN_A_ROW", 1)
    decoder, pcm = _decode_all(path)
    assert len(pcm) / 32000 == pytest.approx(GOFORWARD_SECONDS, abs=0.1)
    assert decoder.errors == 1


async def test_a_multipart_body_cut_before_its_closing_boundary_is_refused(
    tmp_path: Path,
) -> None:
    # python-multipart's finalize() accepts a body that stops anywhere: the upload must not be
    # taken for complete when its closing boundary never came (issue 13, 4).
    audio = GOFORWARD.read_bytes()
    ctype, body = multipart({"model": "whisper-1"}, audio)
    end_of_file_data = body.index(audio) + len(audio)
    with trio.fail_after(30):
        for cut in (end_of_file_data, end_of_file_data + 2, len(body) - 5):
            with pytest.raises(BadRequest, match="closing boundary") as info:
                await receive_upload(
                    ctype, None, chunks(body[:cut]), max_bytes=10**6, spool_dir=str(tmp_path)
                )
            assert info.value.code == "BAD_REQUEST"
            assert list(tmp_path.iterdir()) == []
        # Its closing CRLF is optional.
        upload = await receive_upload(
            ctype, None, chunks(body[:-2]), max_bytes=10**6, spool_dir=str(tmp_path)
        )
        assert upload.size == len(audio)
        await upload.aclose()
        async with (
            run_gateway(_scripted_config(tmp_path / "gw")) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
        ):
            for route, _ in UPLOAD_ROUTES:
                r = await c.post(
                    route, content=body[:end_of_file_data], headers={"content-type": ctype}
                )
                assert r.status_code == 400, (route, r.text)
                error = r.json()
                code = error["error"]["code"] if "error" in error else error["code"]
                assert code.upper() == "BAD_REQUEST", (route, error)
