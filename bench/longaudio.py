"""Long-audio benchmark: the gateway's memory stays bounded whatever the length of the audio.

It generates two Ogg/Opus files with PyAV into a temporary directory (the same signal and encoder
settings, 1 minute and 2 hours long), then for each file starts a fresh ``gateway serve``
subprocess on 127.0.0.1 with a scripted engine (no delay, so it consumes audio as fast as the
decoder produces it) and streams the file through ``POST /v1/transcriptions/stream`` with a
reader that keeps up. Each process's peak RSS is its ``VmHWM`` from ``/proc/<pid>/status``; a
fresh process per file makes the peaks comparable. Target: the 2-hour peak is at most the
1-minute peak + 32 MiB.

Then the 2-hour file once more, on another fresh process, with a slow SSE reader that takes one
event per second: the gateway conflates snapshots for it, so RSS (sampled every second while the
reader reads) must stay flat; it reports the first, last and largest sample.

The scripted engine commits one word per ``--seconds-per-word`` of audio (2 s by default: 3,600
snapshots and a 3,600-segment transcript for 2 hours), so the transcript grows as a real one would.

Run from the repository root: ``python bench/longaudio.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from random import Random
from typing import Any

import av
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    SSEReader,
    machine,
    markdown_table,
    rss_bytes,
    start_gateway,
    upload_request,
)

MIB = 1024 * 1024
TARGET_EXTRA_MIB = 32
STREAM_PATH = "/v1/transcriptions/stream"
# Opus at 16 kHz mono, 6 kbit/s, the encoder's cheapest mode and longest frames: 2 hours of
# low-level noise encode in about 10 s on one core (about 3 MB); the default settings take 35 s.
RATE = 16_000
OPUS_BIT_RATE = 6_000
OPUS_OPTIONS = {"compression_level": "0", "frame_duration": "60"}
NOISE_SECONDS = 10
NOISE_LEVEL = 300.0


def peak_rss(pid: int) -> int:
    """The process's peak resident set size, ``VmHWM`` in ``/proc/<pid>/status``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


# --- audio ----------------------------------------------------------------------------------------


def write_opus(path: Path, seconds: float, seed: int = 1) -> Path:
    """``seconds`` of low-level noise (a 10 s stretch repeated) as Ogg/Opus, 16 kHz mono."""
    rng = Random(seed)
    block = NOISE_SECONDS * RATE
    noise = b"".join(
        max(-32768, min(32767, round(rng.gauss(0.0, NOISE_LEVEL)))).to_bytes(
            2, "little", signed=True
        )
        for _ in range(block)
    )
    total = round(seconds * RATE)
    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=RATE)
        stream.layout = "mono"
        stream.bit_rate = OPUS_BIT_RATE
        stream.codec_context.options = dict(OPUS_OPTIONS)
        pts = 0
        while pts < total:
            n = min(block, total - pts)
            frame = av.AudioFrame(format="s16", layout="mono", samples=n)
            frame.planes[0].update(noise[: 2 * n])
            frame.sample_rate = RATE
            frame.pts = pts
            frame.time_base = Fraction(1, RATE)
            for packet in stream.encode(frame):
                out.mux(packet)
            pts += n
        for packet in stream.encode(None):
            out.mux(packet)
    return path


# --- runs -----------------------------------------------------------------------------------------


def gateway_config(seconds_per_word: float, longest: float) -> dict[str, Any]:
    words = [f"w{i}" for i in range(1, math.ceil(longest / seconds_per_word) + 2)]
    return {
        "server": {"default_engine": "scripted", "keepalive": 0.0},
        "engines": {
            "scripted": {"kind": "scripted", "words": words, "seconds_per_word": seconds_per_word}
        },
    }


@dataclass
class Run:
    label: str
    audio_seconds: float
    upload_bytes: int
    snapshots: int = 0
    wall: float = 0.0
    idle_rss: int = 0
    peak_rss: int = 0
    segments: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)


async def stream_file(
    url: str, pid: int, body: bytes, run: Run, *, pause: float = 0.0, sample_every: float = 0.0
) -> None:
    """Stream ``body`` through the gateway; ``pause`` seconds after each event (a slow reader);
    with ``sample_every``, sample the gateway's RSS from the response headers to ``done``."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = upload_request(host, int(port), STREAM_PATH + "?use_cache=false", body, "audio/ogg")
    t0 = time.perf_counter()
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream, trio.open_nursery() as nursery:
        reader = SSEReader(stream)
        await stream.send_all(request)
        if await reader.head() != 200:
            raise RuntimeError(f"{run.label}: HTTP {reader.status}: {await reader.body()!r}")
        if sample_every:

            async def sample() -> None:
                while True:
                    run.samples.append((time.perf_counter() - t0, rss_bytes(pid)))
                    await trio.sleep(sample_every)

            nursery.start_soon(sample)
        done = b""
        async for frame, _ in reader.events():
            if frame.startswith(b"event: transcription"):
                run.snapshots += 1
            elif frame.startswith(b"event: done"):
                done = frame
            elif frame.startswith(b"event: error"):
                raise RuntimeError(f"{run.label}: {frame!r}")
            if pause and not done:
                await trio.sleep(pause)
        if sample_every:
            run.samples.append((time.perf_counter() - t0, rss_bytes(pid)))
        nursery.cancel_scope.cancel()
    run.wall = time.perf_counter() - t0
    if not done:
        raise RuntimeError(f"{run.label}: the stream ended without a done event")
    run.segments = len(json.loads(done.split(b"data: ", 1)[1])["segments"])


async def measure(
    label: str, audio: Path, seconds: float, config: dict[str, Any], *, slow: bool = False
) -> Run:
    body = audio.read_bytes()
    run = Run(label, seconds, len(body))
    with start_gateway(config) as gateway:
        run.idle_rss = rss_bytes(gateway.pid)
        if slow:
            await stream_file(gateway.url, gateway.pid, body, run, pause=1.0, sample_every=1.0)
        else:
            await stream_file(gateway.url, gateway.pid, body, run)
        run.peak_rss = peak_rss(gateway.pid)
    print(
        f"{label}: {run.snapshots} snapshots in {run.wall:.1f} s, peak RSS {mib(run.peak_rss)} MiB",
        file=sys.stderr,
    )
    return run


def duration(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


async def amain(args: argparse.Namespace) -> int:
    print("Long-audio benchmark: gateway serve subprocess on 127.0.0.1, scripted engine (delay 0)")
    print(machine(("trio", "hypercorn", "av")))
    short_s, long_s = args.short_minutes * 60.0, args.long_minutes * 60.0
    config = gateway_config(args.seconds_per_word, long_s)
    with tempfile.TemporaryDirectory(prefix="bench-longaudio-") as tmp:
        t0 = time.perf_counter()
        short = write_opus(Path(tmp) / "short.opus", short_s)
        t1 = time.perf_counter()
        long = write_opus(Path(tmp) / "long.opus", long_s)
        encode_long = time.perf_counter() - t1
        print(
            f"generated {duration(short_s)} in {t1 - t0:.1f} s and {duration(long_s)} in "
            f"{encode_long:.1f} s",
            file=sys.stderr,
        )
        runs = [
            await measure(duration(short_s), short, short_s, config),
            await measure(duration(long_s), long, long_s, config),
        ]
        slow = await measure(f"{duration(long_s)}, slow reader", long, long_s, config, slow=True)

    base, big = runs
    limit = base.peak_rss + TARGET_EXTRA_MIB * MIB
    ok = big.peak_rss <= limit
    print(
        markdown_table(
            f"Peak RSS per file (MiB), a fresh gateway process each. Ogg/Opus "
            f"{OPUS_BIT_RATE // 1000} kbit/s 16 kHz mono noise ({duration(long_s)} encoded with "
            f"PyAV in {encode_long:.1f} s); scripted engine, one word per "
            f"{args.seconds_per_word:g} s of audio",
            [
                "file",
                "upload KiB",
                "snapshots read",
                "segments",
                "wall s",
                "idle RSS",
                "peak RSS (VmHWM)",
                "peak - idle",
            ],
            [
                [
                    r.label,
                    f"{r.upload_bytes / 1024:.0f}",
                    str(r.snapshots),
                    str(r.segments),
                    f"{r.wall:.1f}",
                    mib(r.idle_rss),
                    mib(r.peak_rss),
                    mib(r.peak_rss - r.idle_rss),
                ]
                for r in runs
            ],
        )
    )
    print(
        f"\nTarget: {big.label} peak <= {base.label} peak + {TARGET_EXTRA_MIB} MiB = "
        f"{mib(limit)} MiB: {'met' if ok else 'MISSED'} ({mib(big.peak_rss)} MiB, "
        f"{(big.peak_rss - base.peak_rss) / MIB:+.1f} MiB)."
    )
    values = [v for _, v in slow.samples]
    print(
        markdown_table(
            f"Slow reader (one event per second), {duration(long_s)} file: gateway RSS (MiB) "
            "sampled every second from the response headers to done",
            ["events read", "wall s", "samples", "first", "last", "max", "last - first"],
            [
                [
                    str(slow.snapshots + 1),
                    f"{slow.wall:.1f}",
                    str(len(values)),
                    mib(values[0]),
                    mib(values[-1]),
                    mib(max(values)),
                    f"{(values[-1] - values[0]) / MIB:+.1f}",
                ]
            ],
        )
    )
    every = max(1, len(values) // 10)
    trace = ", ".join(f"{t:.0f} s: {mib(v)}" for t, v in slow.samples[::every])
    print(f"\nRSS over time (MiB): {trace}")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long-minutes", type=float, default=120.0)
    parser.add_argument("--short-minutes", type=float, default=1.0)
    parser.add_argument(
        "--seconds-per-word",
        type=float,
        default=2.0,
        help="audio seconds per scripted word: one snapshot each",
    )
    args = parser.parse_args()
    sys.exit(trio.run(amain, args))


if __name__ == "__main__":
    main()
