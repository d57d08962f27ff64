"""Audio in: spooling uploads to disk while hashing them, and decoding them with PyAV.

Uploads are never held in memory whole: the request body is parsed incrementally (multipart or raw),
the file's bytes go to a temporary file in batches, and a blake2b digest is updated as they pass.
The size limit is enforced while receiving, so an oversize upload is refused after at most
``max_upload_bytes`` plus one network chunk.

Decoding runs on worker threads, a bounded step at a time (:meth:`PcmDecoder.read`), so a cancelled
request never waits for more than one step and memory stays bounded whatever the file's length.

Spool files and crashes. A gateway killed with SIGKILL (or by the OOM killer, or a power loss)
cannot remove its spool files, so start-up removes those left by dead gateways
(:func:`sweep_spool`). Two rules make that safe in a shared directory such as /tmp:

- the gateway's files are recognisable: their names start with :data:`SPOOL_PREFIX`, and no other
  file is ever touched;
- a live gateway's files are never removed, even by another gateway sharing the spool directory:
  each spool file carries an exclusive ``flock`` on the descriptor its writer keeps open until
  the upload is released. The kernel drops the lock when the process dies, however it dies, so
  "the lock can be taken" means "its writer is gone". A lock is used rather than a pid in the
  name because pids are reused and are not unique across containers sharing a volume (each
  gateway may be pid 1); and per file rather than per process directory, so the directory holds
  nothing between uploads.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import re
import tempfile
from collections.abc import AsyncGenerator, Callable
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
    "MAX_BAD_PACKETS_IN_A_ROW",
    "MULTIPART_OVERHEAD",
    "SPOOL_BATCH_BYTES",
    "SPOOL_PREFIX",
    "PcmDecoder",
    "Upload",
    "content_id",
    "decode_packet",
    "open_decoder",
    "receive_upload",
    "sweep_spool",
]

av.logging.set_level(av.logging.PANIC)

# Spooled bytes are written to disk in batches of this size: the most upload data held in memory.
SPOOL_BATCH_BYTES = 256 * 1024
# Total size of the non-file multipart fields (options such as engine, language, model, ...).
MAX_FIELD_BYTES = 64 * 1024
# Multipart framing allowed on top of the file when checking Content-Length up front.
MULTIPART_OVERHEAD = 64 * 1024
FILE_FIELD = "file"
# Spool files are named <SPOOL_PREFIX><random>.bin: the prefix marks them as the gateway's own.
SPOOL_PREFIX = "asr-gateway-upload-"


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
    # The open spool file: it holds its lock (see the module docstring) until aclose().
    spool_file: Any = field(default=None, repr=False)

    def field(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[-1] if values else default

    async def aclose(self) -> None:
        """Remove the spool file. Idempotent, and runs even when cancelled."""
        path, self.path = self.path, ""
        file, self.spool_file = self.spool_file, None
        if path or file is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove_spool_file, path, file)


def _remove_spool_file(path: str, file: Any) -> None:
    # Unlinked before its lock is released: a sweeper never sees an unlocked file of ours.
    try:
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        if file is not None:
            file.close()


def _same_file(path: str, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _create_spool_file(directory: str | None) -> Any:
    """A new spool file, open for writing and locked (see the module docstring)."""
    while True:
        file = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=SPOOL_PREFIX, suffix=".bin", dir=directory, delete=False
        )
        try:
            # Blocking: another gateway's sweep holds the lock only to unlink the file.
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            # A sweep that starts between the file's creation and the lock sees an unlocked
            # file and removes it; then this name is gone and a new file is made.
            if _same_file(file.name, file.fileno()):
                return file
        except BaseException:
            _remove_spool_file(file.name, file)
            raise
        file.close()


def sweep_spool(spool_dir: str | None) -> int:
    """Remove the spool files left by gateways that are gone (killed, crashed): the files named
    with :data:`SPOOL_PREFIX` whose lock nobody holds. Returns how many were removed. Files of
    live gateways sharing the directory, and every other file, are left alone."""
    directory = spool_dir or tempfile.gettempdir()
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not entry.name.startswith(SPOOL_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # removed meanwhile, or another user's
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live upload
            if _same_file(entry.path, fd):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
        finally:
            os.close(fd)
    return removed


class _Spool:
    """Writes the file part to a temporary file in batches, hashing as it goes.

    The file is created by the first flush, and an upload smaller than one batch is created,
    written and flushed in one worker-thread call: each hand-off to a thread costs about as much
    as writing 100 KB. The file stays open, holding its lock, until the upload is released.
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

    def _write(self, batch: bytes, last: bool) -> None:
        if self.file is None:
            # Kept open (and locked) until discard() or Upload.aclose().
            self.file = _create_spool_file(self._dir)
            self.path = self.file.name
        self.file.write(batch)
        if last:
            self.file.flush()  # the decoder opens the file by its name

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
        _remove_spool_file(self.path, self.file)

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
        # Set by the closing boundary: python-multipart's finalize() accepts a body cut short.
        self.ended = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_end": self._end,
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

    def _end(self) -> None:
        self.ended = True


async def _spool_body(
    body: AsyncGenerator[bytes, None], feed: Callable[[bytes], object], spool: _Spool
) -> None:
    """Pass each chunk of ``body`` to ``feed`` (which puts file bytes in the spool), writing the
    spool to disk whenever a batch is full."""
    async with aclosing(body):
        async for chunk in body:
            feed(chunk)
            if spool.should_flush:
                await spool.flush()


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
                await _spool_body(body, parser.write, spool)
                parser.finalize()
            except MultipartParseError as exc:
                raise BadRequest(f"malformed multipart body: {exc}") from exc
            if not sink.ended:
                raise BadRequest("malformed multipart body: it ends before its closing boundary")
            if not sink.file_seen:
                raise MissingFile("multipart body has no 'file' field")
            filename, file_type, fields = sink.filename, sink.content_type, sink.fields
        else:
            await _spool_body(body, spool.feed, spool)
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
        spool_file=spool.file,
    )


# The first open reads at most this much to find the format and the audio stream. FFmpeg's default
# (5 MB) makes it read and parse a whole short PCM WAV: ~3.5 ms per open instead of ~0.4 ms. A
# file that needs more (no audio stream or no sample rate found) is opened again with the default.
FAST_PROBE_BYTES = 4096
# Packets the codec rejects in a row before the rest of the file is taken for garbage.
MAX_BAD_PACKETS_IN_A_ROW = 64


def decode_packet(packet: Any, bad_in_a_row: int) -> tuple[list[Any], int]:
    """A packet's frames, and how many corrupt packets now stand in a row: a corrupt packet (a
    truncated last frame, a splice of two MP3s) is skipped, and past MAX_BAD_PACKETS_IN_A_ROW of
    them the rest is garbage that would only cost time to read."""
    try:
        return packet.decode(), 0
    except av.FFmpegError:
        return [], bad_in_a_row + 1


# Chained Ogg links opened on their own (see PcmDecoder._next_link) before the rest is given up.
MAX_LINKS = 1000
_OGG_CAPTURE = b"OggS"


def _open_container(path: str, offset: int = 0) -> Any:
    """Open ``path`` for its first audio stream, starting ``offset`` bytes into the file."""
    skip = {"skip_initial_bytes": str(offset)} if offset else {}
    try:
        container = av.open(
            path,
            mode="r",
            metadata_errors="ignore",
            container_options={"probesize": str(FAST_PROBE_BYTES), **skip},
        )
    except (av.FFmpegError, UnicodeDecodeError, ValueError):
        container = None
    if container is not None:
        audio = container.streams.audio
        if audio and _has_decoder(audio[0]) and audio[0].codec_context.sample_rate:
            return container
        container.close()
    try:
        container = av.open(path, mode="r", metadata_errors="ignore", container_options=skip)
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"not a readable audio file ({_reason(exc)})") from exc
    audio = container.streams.audio
    if not audio:
        container.close()
        raise DecodeError("the file has no audio stream")
    if not _has_decoder(audio[0]):
        container.close()
        raise DecodeError("no decoder for the file's audio codec")
    return container


def _has_decoder(stream: Any) -> bool:
    # No codec context: FFmpeg reads the container but has no decoder for the codec (say, a WAV
    # format tag it does not know, or float samples of 16 bits).
    return stream.codec_context is not None


def _next_ogg_link(path: str, start: int) -> int | None:
    """The offset of the first Ogg page at or after ``start`` that begins a logical stream."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        i = m.find(_OGG_CAPTURE, start)
        while i != -1:
            # A page header: "OggS", version 0, then the header type, where 0x02 marks the first
            # page of a logical stream (a link of a chain starts with one).
            if i + 5 < len(m) and m[i + 4] == 0 and m[i + 5] & 0x02:
                return i
            i = m.find(_OGG_CAPTURE, i + 1)
    return None


class PcmDecoder:
    """Decodes any container PyAV reads into s16le 16 kHz mono, a bounded step at a time.

    The FFmpeg state (about 80 KiB with its buffers, and a file descriptor) is held only while it
    is needed: it is released at the end of the audio, and :meth:`suspend` releases it early (a
    job waiting in an engine's queue); the next :meth:`read` then opens the file again from its
    start. Not thread-safe; use it from one thread at a time (the pipeline calls it via to_thread).

    Damaged audio is decoded past, as the ffmpeg CLI does: a packet the codec rejects is skipped;
    a change of sample rate, sample format or channels mid-stream (a mixed-rate MP3) gets a new
    resampler; and a chained Ogg link that FFmpeg's demuxer refuses to follow (one that changes
    the rate or the channels) is opened on its own. :attr:`errors` counts what was skipped. Only a
    file from which nothing decodes is a DecodeError (see :func:`open_decoder`).
    """

    RATE = 16_000

    def __init__(self, path: str) -> None:
        self._path = path
        self._container: Any = None
        self._start()
        self.duration = _duration(self._container, self._stream)

    def _start(self) -> None:
        """Start decoding from the beginning of the file."""
        self._open(0)
        self._pending = bytearray()
        self._eof = False
        self._resampler: Any = None
        self._resampler_key: tuple[str, int, str] | None = None
        self._decoded = 0
        self._bad_in_a_row = 0
        self._links = 0
        #: Damaged packets skipped and links that could not be followed, so far.
        self.errors = 0

    def _open(self, offset: int) -> None:
        self._container = _open_container(self._path, offset)
        self._stream = self._container.streams.audio[0]
        self._packets = self._container.demux(self._stream)
        # Where the current link starts, and the furthest packet read from it (byte offsets).
        self._offset = self._position = offset

    @property
    def seconds(self) -> float:
        """Seconds of audio decoded so far: the audio's true length once the end is reached."""
        return self._decoded / (2 * self.RATE)

    def _add(self, frame: Any) -> None:
        # A plane may be padded for alignment: only the real samples count.
        n = frame.samples * 2
        self._pending += memoryview(frame.planes[0])[:n]
        self._decoded += n

    def _drain(self) -> None:
        """Flush the resampler's buffered samples and drop it."""
        if self._resampler is not None:
            resampler, self._resampler, self._resampler_key = self._resampler, None, None
            for out in resampler.resample(None):
                self._add(out)

    def _append(self, frame: Any) -> None:
        # Input that is already s16 mono 16 kHz (the usual ASR WAV) skips the resampler, which
        # costs ~28 us per 1024-sample frame even when it changes nothing (PyAV only passes
        # frames through when the layouts match by name). A frame in another format than the
        # resampler's (a rate change mid-stream) first drains it, so samples keep their order,
        # and then gets a resampler of its own: PyAV's refuses frames unlike its first.
        key = (frame.format.name, frame.sample_rate, frame.layout.name)
        if self._resampler is not None and key != self._resampler_key:
            self._drain()
        if self._resampler is None:
            if key[0] == "s16" and key[1] == self.RATE and frame.layout.nb_channels == 1:
                self._add(frame)
                return
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self.RATE)
            self._resampler_key = key
        for out in self._resampler.resample(frame):
            self._add(out)

    def _finish(self) -> None:
        self._drain()
        self._eof = True
        self._release()

    def _next_link(self) -> bool:
        """After the demuxer failed, open the next link of a chained Ogg on its own; False when
        there is none (or the file is not an Ogg)."""
        if "ogg" not in self._container.format.name.split(","):
            return False
        start = _next_ogg_link(self._path, self._position + 1)
        self._release()
        # The new link's timestamps start again from zero: the resampler must not see that.
        self._drain()
        while start is not None and self._links < MAX_LINKS:
            self._links += 1
            try:
                self._open(start)
                return True
            except DecodeError:
                self.errors += 1
                start = _next_ogg_link(self._path, start + 1)
        return False

    def _pump(self) -> None:
        try:
            packet = next(self._packets)
        except StopIteration:
            self._finish()
            return
        except av.FFmpegError:
            # The demuxer cannot go on: a damaged container, or a chained Ogg whose next link
            # FFmpeg does not follow.
            self.errors += 1
            if not self._next_link():
                self._finish()
            return
        if packet.pos is not None and packet.pos > self._position:
            self._position = packet.pos
        frames, self._bad_in_a_row = decode_packet(packet, self._bad_in_a_row)
        if self._bad_in_a_row:
            self.errors += 1
            if self._bad_in_a_row >= MAX_BAD_PACKETS_IN_A_ROW:
                self._finish()
            return
        for frame in frames:
            self._append(frame)

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of PCM (an even count); ``b""`` at the end."""
        try:
            if self._container is None and not self._eof:
                self._start()
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
    """The length of the audio stream that is decoded, when the file tells it.

    Not the container's duration when it holds other streams: that is the longest one's (a video
    track longer than the audio, or a second, longer audio stream). Matroska and WebM give no
    stream duration, but their muxers write each track's length as a DURATION tag.
    """
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    tagged = _tag_seconds(stream.metadata.get("DURATION") or stream.metadata.get("duration"))
    if tagged is not None:
        return tagged
    timed = [
        s
        for s in container.streams
        if s.type in ("audio", "video") and not s.disposition & av.stream.Disposition.attached_pic
    ]
    if timed == [stream] and container.duration is not None:
        return float(container.duration / 1_000_000)
    return None


_TAG_DURATION = re.compile(r"(\d+):([0-5]?\d):(\d+(?:\.\d*)?)")


def _tag_seconds(value: str | None) -> float | None:
    """Seconds of an ``HH:MM:SS.fraction`` duration tag; None when absent or malformed."""
    match = _TAG_DURATION.fullmatch(value.strip()) if value else None
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


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
        damaged = f"; {decoder.errors} damaged part(s) skipped" if decoder.errors else ""
        raise DecodeError(f"no audio could be decoded from the file{damaged}")
    return decoder


def _reason(exc: Exception) -> str:
    # FFmpeg errors carry the spool path in str(exc); clients get the reason only.
    return getattr(exc, "strerror", None) or type(exc).__name__
