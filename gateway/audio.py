"""Audio in: spooling uploads to disk while hashing them, and decoding them with PyAV.

Uploads are never held in memory whole: the request body is parsed incrementally (multipart or raw),
the file's bytes go to a temporary file in batches, and a blake2b digest is updated as they pass.
The size limit is enforced while receiving, so an oversize upload is refused after at most
``max_upload_bytes`` plus one network chunk.

Decoding runs on worker threads, a bounded step at a time (:meth:`PcmDecoder.read`), so a cancelled
request never waits for more than one step and memory stays bounded whatever the file's length.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio
import av
import av.logging
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import (
    BadRequest,
    DecodeError,
    EmptyFile,
    MissingFile,
    PayloadTooLarge,
    UnsupportedMediaType,
)

__all__ = [
    "PcmDecoder",
    "Upload",
    "content_id",
    "open_decoder",
    "receive_upload",
]

av.logging.set_level(av.logging.PANIC)

# Spooled bytes are written to disk in batches of this size: the most upload data held in memory.
SPOOL_BATCH_BYTES = 256 * 1024
# Total size of the non-file multipart fields (options such as engine, language, model, ...).
MAX_FIELD_BYTES = 64 * 1024
# Multipart framing allowed on top of the file when checking Content-Length up front.
MULTIPART_OVERHEAD = 64 * 1024
FILE_FIELD = "file"


def content_id(digest: hashlib.blake2b) -> str:
    """The transcript id: blake2b-128 of the uploaded bytes, hex. Same bytes, same id."""
    return digest.hexdigest()


@dataclass(eq=False, kw_only=True)
class Upload:
    path: str
    size: int
    id: str
    filename: str = ""
    content_type: str = "application/octet-stream"
    fields: dict[str, list[str]] = field(default_factory=dict)

    def field(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[-1] if values else default

    async def aclose(self) -> None:
        """Remove the spool file. Idempotent, and runs even when cancelled."""
        path, self.path = self.path, ""
        if path:
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(os.unlink, path)
                except FileNotFoundError:
                    pass


class _Spool:
    """Writes the file part to a temporary file in batches, hashing as it goes.

    The file is created by the first flush, and an upload smaller than one batch is created,
    written and closed in one worker-thread call: each hand-off to a thread costs about as much
    as writing 100 KB.
    """

    def __init__(self, spool_dir: str | None, max_bytes: int) -> None:
        self._dir = spool_dir or None
        self._max = max_bytes
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.size = 0
        self.digest = hashlib.blake2b(digest_size=16)
        self.file: Any = None
        self.path = ""

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._max:
            raise PayloadTooLarge(f"upload exceeds max_upload_bytes ({self._max})")
        self.digest.update(data)
        self._pending.append(data)
        self._pending_size += len(data)

    @property
    def should_flush(self) -> bool:
        return self._pending_size >= SPOOL_BATCH_BYTES

    def _write(self, batch: bytes, close: bool) -> None:
        if self.file is None:
            # Kept open across batches; finish() or discard() closes it.
            self.file = tempfile.NamedTemporaryFile(  # noqa: SIM115
                prefix="upload-", suffix=".bin", dir=self._dir, delete=False
            )
            self.path = self.file.name
        self.file.write(batch)
        if close:
            self.file.close()

    def _take_batch(self) -> bytes:
        batch = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        return batch

    async def flush(self) -> None:
        if self._pending:
            await anyio.to_thread.run_sync(self._write, self._take_batch(), False)

    async def finish(self) -> None:
        await anyio.to_thread.run_sync(self._write, self._take_batch(), True)

    def _discard(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def discard(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.file is not None:
                await anyio.to_thread.run_sync(self._discard)


class _MultipartSink:
    """Callbacks for python-multipart's push parser: file bytes to the spool, fields to memory."""

    def __init__(self, spool: _Spool) -> None:
        self.spool = spool
        self.fields: dict[str, list[str]] = {}
        self.field_bytes = 0
        self.file_seen = False
        self.filename = ""
        self.content_type = ""
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._name = ""
        self._is_file = False
        self._buf: list[bytes] = []

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._buf = []
        self._name = ""
        self._is_file = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._hname.lower()] = self._hvalue
        self._hname = self._hvalue = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if self._name == FILE_FIELD and not self.file_seen:
            self._is_file = True
            self.file_seen = True
            self.filename = (filename or b"").decode("utf-8", "replace")
            ctype, _ = parse_options_header(self._headers.get(b"content-type", b""))
            self.content_type = ctype.decode("latin-1") or "application/octet-stream"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.spool.feed(data[start:end])
            return
        self.field_bytes += end - start
        if self.field_bytes > MAX_FIELD_BYTES:
            raise BadRequest("form fields exceed 64 KiB")
        self._buf.append(data[start:end])

    def _part_end(self) -> None:
        if not self._is_file and self._name:
            value = b"".join(self._buf).decode("utf-8", "replace")
            self.fields.setdefault(self._name, []).append(value)


async def receive_upload(
    content_type: str,
    content_length: int | None,
    body: AsyncGenerator[bytes, None],
    *,
    max_bytes: int,
    spool_dir: str | None = None,
) -> Upload:
    """Spool a request body (multipart with a ``file`` field, or raw audio) to disk.

    Raises MissingFile, EmptyFile, PayloadTooLarge, UnsupportedMediaType or BadRequest.
    """
    ctype, params = parse_options_header(content_type or "")
    media = ctype.decode("latin-1").lower()
    multipart = media == "multipart/form-data"
    if not multipart and not (
        media.startswith("audio/")
        or media in ("application/octet-stream", "video/mp4", "video/webm", "video/ogg")
    ):
        raise UnsupportedMediaType(
            f"expected multipart/form-data, audio/* or application/octet-stream, got {media or 'none'!r}"
        )
    allowance = MULTIPART_OVERHEAD if multipart else 0
    if content_length is not None and content_length > max_bytes + allowance:
        raise PayloadTooLarge(f"upload of {content_length} bytes exceeds {max_bytes}")

    spool = _Spool(spool_dir, max_bytes)
    try:
        if multipart:
            boundary = params.get(b"boundary")
            if not boundary:
                raise BadRequest("multipart body without a boundary")
            sink = _MultipartSink(spool)
            parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
            try:
                async with aclosing(body):
                    async for chunk in body:
                        parser.write(chunk)
                        if spool.should_flush:
                            await spool.flush()
                parser.finalize()
            except MultipartParseError as exc:
                raise BadRequest(f"malformed multipart body: {exc}") from exc
            if not sink.file_seen:
                raise MissingFile("multipart body has no 'file' field")
            filename, file_type, fields = sink.filename, sink.content_type, sink.fields
        else:
            async with aclosing(body):
                async for chunk in body:
                    spool.feed(chunk)
                    if spool.should_flush:
                        await spool.flush()
            filename, file_type, fields = "", media, {}
        await spool.finish()
        if spool.size == 0:
            raise EmptyFile("the uploaded file is empty")
    except BaseException:
        await spool.discard()
        raise
    return Upload(
        path=spool.path,
        size=spool.size,
        id=content_id(spool.digest),
        filename=filename,
        content_type=file_type,
        fields=fields,
    )


# The first open reads at most this much to find the format and the audio stream. FFmpeg's default
# (5 MB) makes it read and parse a whole short PCM WAV: ~3.5 ms per open instead of ~0.4 ms. A
# file that needs more (no audio stream or no sample rate found) is opened again with the default.
FAST_PROBE_BYTES = 4096


def _open_container(path: str) -> Any:
    try:
        container = av.open(
            path,
            mode="r",
            metadata_errors="ignore",
            container_options={"probesize": str(FAST_PROBE_BYTES)},
        )
    except (av.FFmpegError, UnicodeDecodeError, ValueError):
        container = None
    if container is not None:
        audio = container.streams.audio
        if audio and audio[0].codec_context.sample_rate:
            return container
        container.close()
    try:
        container = av.open(path, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"not a readable audio file ({_reason(exc)})") from exc
    if not container.streams.audio:
        container.close()
        raise DecodeError("the file has no audio stream")
    return container


class PcmDecoder:
    """Decodes any container PyAV reads into s16le 16 kHz mono, a bounded step at a time.

    The FFmpeg state (about 80 KiB with its buffers, and a file descriptor) is held only while it
    is needed: it is released at the end of the audio, and :meth:`suspend` releases it early (a
    job waiting in an engine's queue); the next :meth:`read` then opens the file again from its
    start. Not thread-safe; use it from one thread at a time (the pipeline calls it via to_thread).
    """

    RATE = 16_000

    def __init__(self, path: str) -> None:
        self._path = path
        self._container: Any = None
        self._open()
        self.duration = _duration(self._container, self._stream)

    def _open(self) -> None:
        self._container = _open_container(self._path)
        self._stream = self._container.streams.audio[0]
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self.RATE)
        self._packets = self._container.demux(self._stream)
        self._pending = bytearray()
        self._eof = False
        self._direct = True

    def _append(self, frame: Any) -> None:
        # Input that is already s16 mono 16 kHz (the usual ASR WAV) skips the resampler, which
        # costs ~28 us per 1024-sample frame even when it changes nothing (PyAV only passes
        # frames through when the layouts match by name). Once a frame needed resampling, all
        # later ones go through the resampler too, so its buffered samples keep their order.
        if self._direct and frame is not None:
            if (
                frame.format.name == "s16"
                and frame.sample_rate == self.RATE
                and frame.layout.nb_channels == 1
            ):
                self._pending += memoryview(frame.planes[0])[: frame.samples * 2]
                return
            self._direct = False
        for out in self._resampler.resample(frame):
            self._pending += memoryview(out.planes[0])[: out.samples * 2]

    def _pump(self) -> None:
        try:
            packet = next(self._packets)
        except StopIteration:
            self._append(None)  # flush the resampler
            self._eof = True
            self._release()
            return
        for frame in packet.decode():
            self._append(frame)

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of PCM (an even count); ``b""`` at the end."""
        try:
            if self._container is None and not self._eof:
                self._open()
            while len(self._pending) < max_bytes and not self._eof:
                self._pump()
        except (av.FFmpegError, ValueError) as exc:
            raise DecodeError(f"audio decoding failed ({_reason(exc)})") from exc
        n = min(max_bytes, len(self._pending)) & ~1
        out = bytes(self._pending[:n])
        del self._pending[:n]
        return out

    def suspend(self) -> None:
        """Release the FFmpeg state and the PCM decoded so far; ``read`` starts again from the
        beginning. Only before the first ``read``, and never while another thread uses it."""
        if self._container is None and not self._pending:
            return
        self._release()
        self._pending = bytearray()
        self._eof = False  # a short file may have reached its end while being probed

    @property
    def is_open(self) -> bool:
        """Whether it holds FFmpeg state (and a descriptor) that :meth:`close` must release."""
        return self._container is not None

    def _release(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            self._packets = iter(())
            container.close()

    def close(self) -> None:
        self._release()
        self._eof = True


def _duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration / 1_000_000)
    return None


def open_decoder(path: str, probe_bytes: int = 3200) -> PcmDecoder:
    """Open and probe: at least some audio must decode, else DecodeError (the 415 case)."""
    decoder = PcmDecoder(path)
    try:
        while len(decoder._pending) < probe_bytes and not decoder._eof:
            decoder._pump()
    except (av.FFmpegError, ValueError) as exc:
        decoder.close()
        raise DecodeError(f"audio decoding failed ({_reason(exc)})") from exc
    except BaseException:
        decoder.close()
        raise
    if not decoder._pending:
        decoder.close()
        raise DecodeError("no audio could be decoded from the file")
    return decoder


def _reason(exc: Exception) -> str:
    # FFmpeg errors carry the spool path in str(exc); clients get the reason only.
    return getattr(exc, "strerror", None) or type(exc).__name__
