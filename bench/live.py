"""Live-audio benchmark: N concurrent microphone-paced streams through the whisper engine.

Each client opens ``GET /v1/transcriptions/live`` on a real ``gateway serve`` (127.0.0.1), sends
the 24.7 s recording as 100 ms PCM frames at real-time pace, then ``{"type": "end"}``, and times
every ``transcription`` frame. When each spoken word ends is known from a direct faster-whisper
decode of the same file with word timestamps (the same model). A word counts as shown once a
snapshot holds at least as many words as the reference up to and including it (in all its text for
a partial, in its committed segments for committed text), so the latency of word i is that
snapshot's arrival minus the moment word i ended in the audio being sent. The figures are p50 and
p95 over all words of all streams. The machine sustains N streams while every stream completes
and the partial p95 (what a listener first sees) stays under 2 s. Committed text waits for a pause
by design (a chunk is decoded whole once its speaker pauses), so its latency holds the length of
the sentence the word was in.

The gateway runs with ``workers = 8`` so that live sessions never wait in the queue: a live
stream needs a fraction of a core (it is decoded as it is heard), and the default ``workers`` (the
CPU count) would queue the third stream on 2 cores.

Run from the repository root: ``python bench/live.py [--streams 1,2,4,6]`` (about 2 minutes),
on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import machine, markdown_table, percentile, start_gateway  # noqa: E402
from wer import normalise  # noqa: E402

from gateway.config import WhisperConfig  # noqa: E402
from gateway.engines._whisper_model import resolve_model  # noqa: E402

AUDIO = ROOT / "tests" / "data" / "ps_librivox_concat.wav"
FRAME_SECONDS = 0.1
TARGET = 2.0


@dataclass
class Stream:
    started: float = 0.0
    # (arrival, words in all the text, words in the committed segments)
    snapshots: list[tuple[float, int, int]] = field(default_factory=list)
    done: bool = False


def reference_word_ends(pcm: bytes) -> list[float]:
    """When each word ends, from a direct decode with word timestamps (normalised words)."""
    from faster_whisper import WhisperModel

    model = WhisperModel(resolve_model(WhisperConfig()), device="cpu", compute_type="int8")
    audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
    segments, _ = model.transcribe(audio, beam_size=5, language="en", word_timestamps=True)
    ends: list[float] = []
    for s in segments:
        for w in s.words or ():
            ends += [float(w.end)] * len(normalise(w.word))
    return ends


async def one_stream(url: str, pcm: bytes, stream: Stream) -> None:
    frame = int(16000 * 2 * FRAME_SECONDS)
    async with open_websocket_url(url, subprotocols=["asr-gateway"]) as ws:
        stream.started = trio.current_time()

        async def speak() -> None:
            for k, i in enumerate(range(0, len(pcm), frame)):
                await trio.sleep_until(stream.started + k * FRAME_SECONDS)
                await ws.send_message(pcm[i : i + frame])
            await ws.send_message(json.dumps({"type": "end"}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(speak)
            while True:
                event: dict[str, Any] = json.loads(await ws.get_message())
                now = trio.current_time()
                if event["type"] in ("transcription", "done"):
                    segments = event["segments"]
                    committed = event.get("committed", len(segments))
                    if event["type"] == "done":
                        committed = len(segments)
                    words = len(normalise(event["text"]))
                    fixed = len(normalise(" ".join(s["text"] for s in segments[:committed])))
                    stream.snapshots.append((now, words, fixed))
                if event["type"] in ("done", "error"):
                    stream.done = event["type"] == "done"
                    nursery.cancel_scope.cancel()
                    return


def latencies(stream: Stream, ends: list[float]) -> tuple[list[float], list[float]]:
    partial: list[float] = []
    committed: list[float] = []
    for i, end in enumerate(ends):
        spoken = stream.started + end
        shown = next((t for t, words, _ in stream.snapshots if words > i), None)
        fixed = next((t for t, _, words in stream.snapshots if words > i), None)
        if shown is not None:
            partial.append(shown - spoken)
        if fixed is not None:
            committed.append(fixed - spoken)
    return partial, committed


async def run(counts: list[int], pcm: bytes, ends: list[float]) -> list[list[str]]:
    rows = []
    config = {"engines": {"embedded": {"kind": "whisper", "workers": 8}}}
    with start_gateway(config) as server:
        url = server.url.replace("http://", "ws://") + "/v1/transcriptions/live?language=en"
        for n in counts:
            streams = [Stream() for _ in range(n)]
            async with trio.open_nursery() as nursery:
                for s in streams:
                    nursery.start_soon(one_stream, url, pcm, s)
            partial: list[float] = []
            committed: list[float] = []
            for s in streams:
                p, c = latencies(s, ends)
                partial += p
                committed += c
            ok = sum(s.done for s in streams)
            p95 = percentile(partial, 95)
            rows.append(
                [
                    str(n),
                    f"{ok}/{n}",
                    f"{percentile(partial, 50):.2f}",
                    f"{percentile(partial, 95):.2f}",
                    f"{percentile(committed, 50):.2f}",
                    f"{percentile(committed, 95):.2f}",
                    "yes" if ok == n and p95 <= TARGET else "no",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,2,3,4,6", help="comma-separated stream counts")
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    with wave.open(str(AUDIO)) as w:
        pcm = w.readframes(w.getnframes())
    print("Live-audio benchmark: microphone-paced streams through the whisper engine, 127.0.0.1")
    print(machine(("faster-whisper", "ctranslate2", "trio-websocket", "hypercorn")))
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    ends = reference_word_ends(pcm)
    rows = trio.run(run, counts, pcm, ends)
    print(
        markdown_table(
            f"Latency from the end of each spoken word to its first appearance ({len(ends)} words"
            f" per stream, {len(pcm) / 32000:.1f} s of audio, 100 ms frames at real-time pace), s",
            [
                "streams",
                "done",
                "partial p50",
                "partial p95",
                "committed p50",
                "committed p95",
                f"sustained (partial p95 <= {TARGET:g} s)",
            ],
            rows,
        )
    )
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")


if __name__ == "__main__":
    main()
