"""Embedded-engine benchmark: the gateway's whisper engine against direct faster-whisper decodes.

Everything below runs in one invocation, one phase after the other, on the reference recordings
in tests/data (each ``<name>.wav`` with a ``<name>.txt`` reference):

1. **Accuracy.** Direct whole-file decodes with faster-whisper (the bundled tiny.en model, the
   engine's beam size and compute type, every core, no VAD), the same files through a real
   ``gateway serve`` (``POST /v1/transcriptions/stream?use_cache=false``), and PocketSphinx's
   direct whole-file decode for contrast: pooled WER and real-time factor.
2. **A lone stream** (the ``make run`` user), on the 24.7 s recording: the direct decode's time
   against the gateway's time to ``done`` and to its first ``transcription`` event, both counted
   from the response headers (sent once the upload is spooled and probed), median of 3.
3. **Many streams.** The machine's limit is one direct single-thread decode per core, in
   parallel processes (3 decodes each); the gateway runs 4 concurrent streams (distinct bytes, so
   no cache hit), 3 times, median. Both in audio seconds per wall second.

Run from the repository root: ``python bench/embedded.py`` (about 3 minutes on 2 cores), on an
otherwise idle machine. WER lower-cases and strips punctuation only (tests/wer.py): "10" against
"ten" counts as an error, so every WER here is pessimistic.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import statistics
import sys
import time
import wave
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import machine, markdown_table, start_gateway  # noqa: E402
from wer import pooled_wer  # noqa: E402

from gateway.config import WhisperConfig  # noqa: E402
from gateway.engines._whisper_model import resolve_model  # noqa: E402

DATA = ROOT / "tests" / "data"
CORPUS = sorted(p.stem for p in DATA.glob("*.wav") if p.with_suffix(".txt").exists())
LONG = "ps_librivox_concat"
STREAM_PATH = "/v1/transcriptions/stream?use_cache=false"
STREAMS = 4
REPEATS = 3
CORES = os.cpu_count() or 1
CFG = WhisperConfig()


@dataclass(frozen=True)
class Audio:
    name: str
    wav: bytes
    samples: np.ndarray  # float32, 16 kHz mono
    seconds: float


def load(name: str, extra_samples: int = 0) -> Audio:
    """A recording as WAV bytes (with ``extra_samples`` of trailing silence) and as samples."""
    with wave.open(str(DATA / f"{name}.wav")) as w:
        params = w.getparams()
        pcm = w.readframes(w.getnframes()) + b"\x00\x00" * extra_samples
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 16000), name
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setparams(params)
        out.writeframes(pcm)
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
    return Audio(name, buf.getvalue(), samples, len(samples) / 16000)


def reference(name: str) -> str:
    return (DATA / f"{name}.txt").read_text(encoding="utf-8")


# --- direct decodes -------------------------------------------------------------------------------


def whisper_model(threads: int) -> Any:
    from faster_whisper import WhisperModel

    return WhisperModel(
        resolve_model(CFG), device="cpu", compute_type=CFG.compute_type, cpu_threads=threads
    )


def decode(model: Any, audio: Audio) -> tuple[str, float]:
    t0 = time.perf_counter()
    segments, _ = model.transcribe(audio.samples, beam_size=CFG.beam_size, language="en")
    text = " ".join(s.text.strip() for s in segments)
    return text, time.perf_counter() - t0


def sphinx_decode(decoder: Any, audio: Audio) -> tuple[str, float]:
    pcm = (audio.samples * 32768).astype(np.int16).tobytes()
    t0 = time.perf_counter()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return (hyp.hypstr if hyp is not None else ""), time.perf_counter() - t0


def _limit_worker(args: tuple[int, Any]) -> float:
    rounds, barrier = args
    model = whisper_model(1)
    audio = load(LONG)
    decode(model, load("ps_goforward"))  # warm up
    barrier.wait()
    t0 = time.perf_counter()
    for _ in range(rounds):
        decode(model, audio)
    return time.perf_counter() - t0


def machine_limit(rounds: int = REPEATS) -> float:
    """Audio s per wall s of one single-thread direct decode per core, in parallel processes."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(CORES)
        with ctx.Pool(CORES) as pool:
            walls = pool.map(_limit_worker, [(rounds, barrier)] * CORES)
    return CORES * rounds * load(LONG).seconds / max(walls)


# --- the gateway ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Streamed:
    headers: float
    first: float  # first transcription event with text, from request start
    done: float
    text: str
    language: str

    @property
    def first_after_upload(self) -> float:
        return self.first - self.headers

    @property
    def done_after_upload(self) -> float:
        return self.done - self.headers


async def stream(client: httpx.AsyncClient, url: str, audio: Audio) -> Streamed:
    files = {"file": (f"{audio.name}.wav", audio.wav, "audio/wav")}
    t0 = time.perf_counter()
    first = float("nan")
    async with client.stream("POST", url + STREAM_PATH, files=files) as response:
        headers = time.perf_counter() - t0
        if response.status_code != 200:
            raise RuntimeError(f"{audio.name}: HTTP {response.status_code}")
        event = ""
        async with aclosing(response.aiter_lines()) as lines:
            async for line in lines:
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    payload = json.loads(line[5:])
                    now = time.perf_counter() - t0
                    if event == "transcription" and payload["text"] and first != first:
                        first = now
                    elif event == "done":
                        return Streamed(headers, first, now, payload["text"], payload["language"])
                    elif event == "error":
                        raise RuntimeError(f"{audio.name}: {payload}")
    raise RuntimeError(f"{audio.name}: no done event")


async def gateway_phase(audios: list[Audio]) -> dict[str, Any]:
    config = {"engines": {"embedded": {"kind": "whisper"}}}
    results: dict[str, Any] = {}
    with start_gateway(config) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            for _ in range(100):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await trio.sleep(0.1)
            await stream(client, "", load("ps_goforward", 3))  # warm up
            results["corpus"] = [await stream(client, "", a) for a in audios]
            results["lone"] = [await stream(client, "", load(LONG, i + 11)) for i in range(REPEATS)]
            rates = []
            for r in range(REPEATS):
                many = [load(LONG, 100 * (r + 1) + i) for i in range(STREAMS)]
                t0 = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for audio in many:
                        nursery.start_soon(stream, client, "", audio)
                rates.append(sum(a.seconds for a in many) / (time.perf_counter() - t0))
            results["many"] = statistics.median(rates)
    return results


def main() -> None:
    import pocketsphinx

    print("Embedded engine benchmark: the whisper engine in `gateway serve` on 127.0.0.1")
    print(machine(("faster-whisper", "ctranslate2", "pocketsphinx", "hypercorn")))
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(
        f"model {CFG.model}, {CFG.compute_type}, beam {CFG.beam_size}; gateway: workers ="
        f" {CFG.workers or CORES}, cpu_threads = {CFG.cpu_threads or CORES},"
        f" word timestamps {CFG.word_timestamps}"
    )
    audios = [load(n) for n in CORPUS]
    total = sum(a.seconds for a in audios)

    model = whisper_model(CORES)
    decode(model, load("ps_goforward"))
    direct = [decode(model, a) for a in audios]
    lone_direct = statistics.median(decode(model, load(LONG))[1] for _ in range(REPEATS))
    del model
    decoder = pocketsphinx.Decoder(loglevel="FATAL")
    sphinx = [sphinx_decode(decoder, a) for a in audios]
    del decoder

    gw = trio.run(gateway_phase, audios)
    limit = machine_limit()

    def wer_of(texts: list[str]) -> str:
        return (
            f"{pooled_wer((reference(a.name), t) for a, t in zip(audios, texts, strict=True)):.1%}"
        )

    gw_wall = sum(s.done_after_upload for s in gw["corpus"])
    print(
        markdown_table(
            f"1. Accuracy on {len(audios)} recordings ({total:.1f} s), each decoded whole",
            ["engine", "pooled WER", "real-time factor"],
            [
                [
                    "PocketSphinx, direct decode",
                    wer_of([t for t, _ in sphinx]),
                    f"{sum(s for _, s in sphinx) / total:.2f}",
                ],
                [
                    f"faster-whisper, direct decode, {CORES} threads",
                    wer_of([t for t, _ in direct]),
                    f"{sum(s for _, s in direct) / total:.2f}",
                ],
                [
                    "the gateway (whisper engine), from upload to done",
                    wer_of([s.text for s in gw["corpus"]]),
                    f"{gw_wall / total:.2f}",
                ],
            ],
        )
    )
    lone = gw["lone"]
    done_gw = statistics.median(s.done_after_upload for s in lone)
    first_gw = statistics.median(s.first_after_upload for s in lone)
    print(
        markdown_table(
            f"2. A lone stream of {LONG} ({load(LONG).seconds:.1f} s), median of {REPEATS}",
            ["measure", "seconds", "target"],
            [
                [f"direct decode, {CORES} threads", f"{lone_direct:.2f}", ""],
                [
                    "gateway: upload complete -> done",
                    f"{done_gw:.2f} ({done_gw / lone_direct:.2f}x direct)",
                    "<= 1.3x direct",
                ],
                [
                    "gateway: upload complete -> first transcription with text",
                    f"{first_gw:.2f}",
                    "<= 2 s",
                ],
            ],
        )
    )
    print(
        markdown_table(
            f"3. Many streams: {STREAMS} concurrent streams of {LONG} (median of {REPEATS} runs)",
            ["measure", "audio s / wall s", "vs limit"],
            [
                [
                    f"machine limit: {CORES} single-thread direct decodes in parallel processes",
                    f"{limit:.1f}",
                    "1.00x",
                ],
                [
                    f"gateway, {STREAMS} concurrent streams",
                    f"{gw['many']:.1f}",
                    f"{gw['many'] / limit:.2f}x (target >= 0.85x)",
                ],
            ],
        )
    )
    assert all(s.language == "en" for s in gw["corpus"])
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")


if __name__ == "__main__":
    main()
