"""Spooling uploads and decoding every supported container with PyAV."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import av
import pytest
from audio_util import FORMATS, GOFORWARD, pcm_of, transcode, write_wav

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
