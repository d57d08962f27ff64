"""Embedded-engine benchmark: direct PocketSphinx decodes against the real gateway on loopback.

For the test recordings in tests/data it measures

1. a direct whole-file PocketSphinx decode (one decoder, created outside the timing): wall time
   and real-time factor;
2. the gateway (in-process, hypercorn on trio at 127.0.0.1:0, engine ``embedded`` with one
   worker, warmed up first): ``POST /v1/transcriptions/stream?use_cache=false`` with the file,
   timing from the response headers (the server answers only once the upload is spooled and
   probed, so this stands for "upload complete") and from the request start to the first
   ``transcription`` event and to ``done``, plus the number of snapshots;
3. the gateway's final text against the direct decode's, and both against the reference text;
4. throughput: 4 concurrent streams of the 24.7 s recording (each with a few extra samples of
   silence so no two uploads are the same bytes) with workers=1 and with workers=2.

Run from the repository root: ``python bench/embedded.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import platform
import re
import sys
import tempfile
import time
import wave
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import pocketsphinx
import trio
from hypercorn.trio import serve as hypercorn_serve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app import create_app  # noqa: E402
from gateway.config import Config  # noqa: E402
from gateway.server import hypercorn_config  # noqa: E402

DATA = ROOT / "tests" / "data"
FILES = ["ps_goforward", "ps_librivox_0880", "ps_librivox_concat"]
WARMUP = "ps_goforward"
WARMUP_EXTRA_SAMPLES = 7  # so the warm-up upload is not the same bytes as a measured one
THROUGHPUT_FILE = "ps_librivox_concat"
THROUGHPUT_STREAMS = 4
STREAM_PATH = "/v1/transcriptions/stream?use_cache=false"


# --- audio and text helpers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Audio:
    name: str
    wav: bytes
    pcm: bytes
    seconds: float


def load(name: str, extra_samples: int = 0) -> Audio:
    """A recording as WAV bytes (with ``extra_samples`` of trailing silence) and as raw PCM."""
    with wave.open(str(DATA / f"{name}.wav")) as w:
        params = w.getparams()
        pcm = w.readframes(w.getnframes())
    pcm += b"\x00\x00" * params.nchannels * extra_samples
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setparams(params)
        out.writeframes(pcm)
    seconds = len(pcm) / (params.sampwidth * params.nchannels * params.framerate)
    return Audio(name, buf.getvalue(), pcm, seconds)


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance / reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def reference_text(name: str) -> str:
    return (DATA / f"{name}.txt").read_text(encoding="utf-8")


# --- 1. direct decode ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Direct:
    seconds: float
    text: str


def decode_direct(decoder: Any, audio: Audio) -> Direct:
    t0 = time.perf_counter()
    decoder.start_utt()
    decoder.process_raw(audio.pcm, full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    elapsed = time.perf_counter() - t0
    return Direct(elapsed, hyp.hypstr if hyp is not None else "")


# --- 2. the gateway -----------------------------------------------------------------------------


@asynccontextmanager
async def run_gateway(workers: int) -> AsyncIterator[str]:
    """The real gateway under hypercorn on trio at 127.0.0.1:0; yields its base URL."""
    with tempfile.TemporaryDirectory(prefix="bench-embedded-") as tmp:
        config = msgspec.convert(
            {
                "store": {"path": str(Path(tmp) / "gateway.sqlite3")},
                "engines": {"embedded": {"kind": "pocketsphinx", "workers": workers}},
            },
            Config,
        )
        app = create_app(config)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                lambda task_status: hypercorn_serve(
                    app,  # type: ignore[arg-type]
                    hypercorn_config(config, "127.0.0.1:0"),
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            try:
                yield str(urls[0])
            finally:
                stop.set()


@dataclass(frozen=True)
class Streamed:
    headers: float  # request start -> response headers
    first: float  # request start -> first transcription event
    done: float  # request start -> done event
    snapshots: int
    text: str
    cached: bool

    @property
    def first_after_upload(self) -> float:
        return self.first - self.headers

    @property
    def done_after_upload(self) -> float:
        return self.done - self.headers


async def stream(client: httpx.AsyncClient, url: str, audio: Audio) -> Streamed:
    """One streamed transcription, with the SSE body parsed as it arrives."""
    files = {"file": (f"{audio.name}.wav", audio.wav, "audio/wav")}
    t0 = time.perf_counter()
    first = done = float("nan")
    snapshots = 0
    final: dict[str, Any] = {}
    async with client.stream("POST", url + STREAM_PATH, files=files) as response:
        headers = time.perf_counter() - t0
        if response.status_code != 200:
            body = await response.aread()
            raise RuntimeError(f"{audio.name}: HTTP {response.status_code}: {body!r}")
        event, data = "message", []
        lines_iter = cast(AsyncGenerator[str, None], response.aiter_lines())
        async with aclosing(lines_iter) as lines:
            async for line in lines:
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif line == "" and data:
                    payload = json.loads("\n".join(data))
                    now = time.perf_counter() - t0
                    if event == "transcription":
                        snapshots += 1
                        if snapshots == 1:
                            first = now
                    elif event == "done":
                        done, final = now, payload
                    elif event == "error":
                        raise RuntimeError(f"{audio.name}: stream error {payload}")
                    event, data = "message", []
    if not final:
        raise RuntimeError(f"{audio.name}: the stream ended without a done event")
    return Streamed(headers, first, done, snapshots, str(final["text"]), bool(final["cached"]))


async def warm_up(client: httpx.AsyncClient, url: str, sessions: int) -> None:
    """Create every worker's decoder (about 0.3 s each) before anything is timed."""
    audio = load(WARMUP, WARMUP_EXTRA_SAMPLES)
    async with trio.open_nursery() as nursery:
        for _ in range(sessions):
            nursery.start_soon(stream, client, url, audio)


async def throughput(workers: int, audios: list[Audio]) -> float:
    """Audio seconds transcribed per wall second for concurrent streams of ``audios``."""
    async with run_gateway(workers) as url, httpx.AsyncClient(timeout=None) as client:
        await warm_up(client, url, workers)
        results: list[Streamed] = []

        async def one(audio: Audio) -> None:
            results.append(await stream(client, url, audio))

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for audio in audios:
                nursery.start_soon(one, audio)
        wall = time.perf_counter() - t0
    assert len(results) == len(audios) and not any(r.cached for r in results)
    return sum(a.seconds for a in audios) / wall


# --- output -------------------------------------------------------------------------------------


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    print(f"\n{title}")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def cpu_model() -> str:
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


async def main() -> None:
    uname = platform.uname()
    print("Embedded engine benchmark (PocketSphinx), gateway on 127.0.0.1 in-process")
    print(
        f"machine: {os.cpu_count()} CPUs, {cpu_model()}, {uname.system} {uname.release} "
        f"{uname.machine}, Python {platform.python_version()}, "
        f"pocketsphinx {importlib.metadata.version('pocketsphinx')}"
    )
    print("All comparisons and ratios below are measured side by side in this same run.")

    audios = [load(name) for name in FILES]

    decoder = pocketsphinx.Decoder(loglevel="FATAL")
    direct = [decode_direct(decoder, a) for a in audios]
    del decoder

    async with run_gateway(1) as url, httpx.AsyncClient(timeout=None) as client:
        await warm_up(client, url, 1)
        streamed = [await stream(client, url, a) for a in audios]
    assert not any(s.cached for s in streamed)

    table(
        "1. Direct PocketSphinx whole-file decode (one decoder, created before timing)",
        ["file", "audio s", "decode s", "RTF"],
        [
            [a.name, f"{a.seconds:.2f}", f"{d.seconds:.3f}", f"{d.seconds / a.seconds:.3f}"]
            for a, d in zip(audios, direct, strict=True)
        ],
    )
    table(
        "2. Gateway stream, workers=1, warmed up; 'after upload' = from response headers "
        "(sent once the upload is spooled and probed), 'total' = from request start",
        [
            "file",
            "audio s",
            "headers s",
            "1st snap s",
            "done s",
            "1st snap total s",
            "done total s",
            "RTF",
            "snapshots",
        ],
        [
            [
                a.name,
                f"{a.seconds:.2f}",
                f"{s.headers:.3f}",
                f"{s.first_after_upload:.3f}",
                f"{s.done_after_upload:.3f}",
                f"{s.first:.3f}",
                f"{s.done:.3f}",
                f"{s.done_after_upload / a.seconds:.3f}",
                str(s.snapshots),
            ]
            for a, s in zip(audios, streamed, strict=True)
        ],
    )
    rows = []
    for a, d, s in zip(audios, direct, streamed, strict=True):
        ref = reference_text(a.name)
        same = words(s.text) == words(d.text)
        rows.append(
            [
                a.name,
                "yes" if same else "no",
                f"{wer(d.text, s.text):.1%}",
                f"{wer(ref, d.text):.1%}",
                f"{wer(ref, s.text):.1%}",
            ]
        )
    table(
        "3. Text: gateway final vs direct decode, and each vs the reference (WER over words, "
        "lowercase, no punctuation)",
        ["file", "identical", "WER gw vs direct", "WER direct vs ref", "WER gw vs ref"],
        rows,
    )

    streams = [load(THROUGHPUT_FILE, i + 1) for i in range(THROUGHPUT_STREAMS)]
    rates = {workers: await throughput(workers, streams) for workers in (1, 2)}
    total = sum(a.seconds for a in streams)
    table(
        f"4. Throughput: {THROUGHPUT_STREAMS} concurrent streams of {THROUGHPUT_FILE} "
        f"({total:.1f} audio s in all, distinct bytes, use_cache=false), warmed up",
        ["workers", "audio s / wall s", "vs workers=1"],
        [[str(w), f"{r:.2f}", f"{r / rates[1]:.2f}x"] for w, r in rates.items()],
    )


if __name__ == "__main__":
    trio.run(main)
