"""Crash safety: SIGKILL ``gateway serve`` at random moments while streams finish and corrections
are written, and check what the next start finds.

One store file and one spool directory serve every round. A round starts the gateway (a real
``gateway serve`` subprocess on 127.0.0.1, the scripted engine with a small per-update delay, so
streams are in flight), runs ``--streams`` clients that upload fresh WAVs to the SSE route one
after another and ``--correctors`` clients that PUT corrections on stored transcripts, and kills
the gateway with SIGKILL at a random moment. The next round's start is the restart, and before it
serves any load these hold, or the round counts a failure:

- the store opened (the gateway served) and ``PRAGMA integrity_check`` answers ``ok``;
- no transcript row is incomplete: each row's text is the scripted engine's whole transcript of
  its upload (a stream cut by the kill stores nothing), its segments, words, duration and UUID
  are whole, and every stream whose ``done`` arrived has its row;
- no correction is lost once its PUT was answered: each stored correction is the last answered
  one for its transcript, or the one whose PUT the kill cut off (at most one per transcript is in
  flight), both in the file and through ``GET /v1/transcriptions/{id}``;
- the spool files the killed gateway left are gone (removed at start-up), while files that are
  not the gateway's own (placed in the spool directory at the start) are still there.

Usage: ``python bench/crash.py [--rounds 50] [--seed 1] [--streams 6] [--correctors 3]``.
Prints a table per round and a summary (Markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, markdown_table, percentile, silent_wav, start_server

# Files in the spool directory that are not the gateway's: start-up must leave them alone. The
# first has the name older gateways gave their spool files, the second shares a prefix with the
# gateway's own.
FOREIGN_FILES = ("upload-foreign.bin", "asr-gateway-notes.txt", "other-program.tmp")
WORDS = [f"w{i}" for i in range(12)]
SECONDS_PER_WORD = 0.25
RATE = 16_000
STREAM = "/v1/transcriptions/stream"


@dataclass(frozen=True)
class Options:
    rounds: int = 50
    seed: int = 1
    streams: int = 6
    correctors: int = 3
    # The kill comes this many seconds after the load starts, uniformly at random.
    kill_min: float = 0.3
    kill_max: float = 2.0
    # The scripted engine's wall-clock delay before each update (one per word).
    delay: float = 0.02


@dataclass
class Round:
    number: int
    kill_at: float = 0.0
    streams_done: int = 0
    streams_cut: int = 0
    puts_answered: int = 0
    puts_cut: int = 0
    client_errors: list[str] = field(default_factory=list)
    spool_left: int = 0  # gateway spool files found right after the kill
    # Filled in by the restart:
    restart_seconds: float = 0.0
    removed_at_start: int = 0
    spool_after_start: int = 0
    integrity: str = ""
    rows: int = 0
    incomplete_rows: list[str] = field(default_factory=list)
    lost_transcripts: list[str] = field(default_factory=list)
    lost_corrections: list[str] = field(default_factory=list)
    foreign_removed: int = 0

    @property
    def failures(self) -> int:
        return (
            (self.integrity != "ok")
            + len(self.incomplete_rows)
            + len(self.lost_transcripts)
            + len(self.lost_corrections)
            + self.spool_after_start
            + self.foreign_removed
            + len(self.client_errors)
        )


@dataclass
class Report:
    rounds: list[Round]
    machine: str

    def total(self, name: str) -> int:
        return sum(
            len(v) if isinstance(v := getattr(r, name), list) else int(v) for r in self.rounds
        )

    @property
    def integrity_failures(self) -> int:
        return sum(r.integrity != "ok" for r in self.rounds)

    @property
    def failures(self) -> int:
        return sum(r.failures for r in self.rounds)


@dataclass
class Ledger:
    """What the clients know was done, across rounds."""

    expected: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> text, duration
    done: list[str] = field(default_factory=list)  # ids whose stream got `done`, in order
    answered: dict[str, str] = field(default_factory=dict)  # id -> last answered correction
    in_flight: dict[str, str] = field(default_factory=dict)  # id -> correction sent, no answer


def wav(rng: Random, words: int) -> tuple[bytes, float]:
    """A fresh (random noise) mono 16 kHz WAV whose scripted transcript is ``words`` words: its
    length is half a word past ``words - 1`` whole ones, away from any rounding edge."""
    samples = round((words - 0.5) * SECONDS_PER_WORD * RATE)
    silence = silent_wav(samples / RATE, RATE)
    header = len(silence) - samples * 2
    return silence[:header] + rng.randbytes(samples * 2), samples / RATE


def spool_files(spool: Path) -> list[str]:
    """The gateway's files in the spool directory: every file but the foreign ones (whatever the
    gateway names its files, so that a gateway without start-up cleanup fails here too)."""
    return sorted(p.name for p in spool.iterdir() if p.name not in FOREIGN_FILES)


def write_config(root: Path, options: Options) -> Path:
    config = root / "gateway.toml"
    config.write_text(
        "[server]\n"
        'default_engine = "scripted"\n'
        f"spool_dir = {json.dumps(str(root / 'spool'))}\n"
        "shutdown_grace = 1.0\n"
        "[store]\n"
        f"path = {json.dumps(str(root / 'gateway.sqlite3'))}\n"
        "[engines.scripted]\n"
        'kind = "scripted"\n'
        f"words = {json.dumps(WORDS)}\n"
        f"seconds_per_word = {SECONDS_PER_WORD}\n"
        f"delay = {options.delay}\n"
    )
    return config


async def sse_done(response: httpx.Response) -> dict[str, Any] | None:
    """The ``done`` event's data, or None when the stream ended another way."""
    event = ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event in ("done", "error"):
            data: dict[str, Any] = json.loads(line[5:])
            return data if event == "done" else None
    return None


class Load:
    """One round's clients; every failure after the kill flag is set counts as cut by the kill."""

    def __init__(self, url: str, ledger: Ledger, result: Round, rng: Random) -> None:
        self.url = url
        self.ledger = ledger
        self.result = result
        self.rng = rng
        self.killed = False

    def _failed(self, what: str, exc: BaseException | str) -> None:
        if not self.killed:
            self.result.client_errors.append(f"{what}: {exc!r}")

    async def streams(self, client: httpx.AsyncClient) -> None:
        while not self.killed:
            body, duration = wav(self.rng, self.rng.randint(2, len(WORDS)))
            id = hashlib.blake2b(body, digest_size=16).hexdigest()
            words = round(duration / SECONDS_PER_WORD + 0.5)
            self.ledger.expected[id] = (" ".join(WORDS[:words]), duration)
            try:
                async with client.stream(
                    "POST", STREAM, content=body, headers={"content-type": "audio/wav"}
                ) as r:
                    done = await sse_done(r) if r.status_code == 200 else None
            except httpx.HTTPError as exc:
                if self.killed:
                    self.result.streams_cut += 1
                self._failed("stream", exc)
                return
            if done is None:
                if self.killed:
                    self.result.streams_cut += 1
                self._failed("stream", f"status {r.status_code}, no done")
                return
            if done.get("id") != id or done.get("text") != self.ledger.expected[id][0]:
                self._failed("stream", f"done {done.get('id')} {done.get('text')!r}")
            self.ledger.done.append(id)
            self.result.streams_done += 1

    async def corrections(self, client: httpx.AsyncClient, worker: int, workers: int) -> None:
        # Worker i owns the stored ids at positions i, i + workers, ...: one PUT per id at a time.
        seq = 0
        while not self.killed:
            mine = self.ledger.done[worker::workers]
            if not mine:
                await trio.sleep(0.01)
                continue
            id = self.rng.choice(mine)
            seq += 1
            text = f"round {self.result.number} corrector {worker} put {seq}"
            self.ledger.in_flight[id] = text
            body = {"segments": [{"start": 0.0, "end": 1.0, "text": text}]}
            try:
                r = await client.put(f"/v1/transcriptions/{id}/corrections", json=body)
            except httpx.HTTPError as exc:
                if self.killed:
                    self.result.puts_cut += 1
                self._failed("PUT", exc)
                return
            if r.status_code != 200:
                self._failed("PUT", f"status {r.status_code}: {r.text[:200]}")
                return
            del self.ledger.in_flight[id]
            self.ledger.answered[id] = text
            self.result.puts_answered += 1


async def load_and_kill(
    url: str, pid: int, options: Options, ledger: Ledger, result: Round, rng: Random
) -> None:
    load = Load(url, ledger, result, rng)
    result.kill_at = rng.uniform(options.kill_min, options.kill_max)
    limits = httpx.Limits(max_connections=options.streams + options.correctors)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(options.streams):
                nursery.start_soon(load.streams, client)
            for i in range(options.correctors):
                nursery.start_soon(load.corrections, client, i, options.correctors)
            await trio.sleep(result.kill_at)
            load.killed = True
            os.kill(pid, signal.SIGKILL)
            # The clients see their connections fail; none may wait for long.
            nursery.cancel_scope.deadline = trio.current_time() + 10


def check_store(path: Path, ledger: Ledger, result: Round) -> dict[str, str | None]:
    """Integrity and rows, read straight from the file; returns id -> stored correction text."""
    conn = sqlite3.connect(path)
    try:
        result.integrity = "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
        rows = conn.execute(
            "SELECT id, uuid, segments, words, text, duration, corrected, corrected_at"
            " FROM transcripts"
        ).fetchall()
    finally:
        conn.close()
    result.rows = len(rows)
    corrections: dict[str, str | None] = {}
    for id, uuid_, segments, words, text, duration, corrected, corrected_at in rows:
        expected = ledger.expected.get(id)
        try:
            segs = json.loads(segments)
            json.loads(words)
            whole = (
                expected is not None
                and text == expected[0]
                and " ".join(s["text"] for s in segs) == text
                and duration is not None
                and abs(duration - expected[1]) < 1e-6
                and uuid_ == str(uuid.uuid5(uuid.NAMESPACE_DNS, id))
                and (corrected is None) == (corrected_at is None)
            )
            fixed = json.loads(corrected) if corrected is not None else None
        except (ValueError, TypeError, KeyError) as exc:
            whole, fixed = False, None
            text = f"{text!r} ({exc})"
        if not whole:
            result.incomplete_rows.append(f"{id}: {text!r}")
        corrections[id] = fixed[0]["text"] if fixed else None
    result.lost_transcripts += [id for id in ledger.done if id not in corrections]
    return corrections


async def check_corrections(
    url: str, stored: dict[str, str | None], ledger: Ledger, result: Round
) -> None:
    """Each answered correction (or the one the kill cut off) is stored and served."""
    ids = sorted(set(ledger.answered) | set(ledger.in_flight))
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for id in ids:
            allowed = {ledger.answered.get(id), ledger.in_flight.get(id)} - {None}
            if id not in ledger.answered:
                allowed.add(None)  # never answered: no correction is fine too
            r = await client.get(f"/v1/transcriptions/{id}")
            served = r.json()["text"] if r.status_code == 200 and r.json()["corrected"] else None
            if stored.get(id) not in allowed or served != stored.get(id):
                result.lost_corrections.append(
                    f"{id}: stored {stored.get(id)!r}, served {served!r}, allowed {allowed!r}"
                )
            elif stored.get(id) is not None:
                ledger.answered[id] = stored[id]  # type: ignore[assignment]
    ledger.in_flight.clear()


@contextlib.contextmanager
def gateway(root: Path, config: Path, number: int) -> Any:
    logs = root / f"round-{number:03d}"
    logs.mkdir()
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    with start_server([*argv, "--bind", "127.0.0.1:0"], workdir=logs, start_timeout=60) as server:
        yield server


def removed_at_start(log: str) -> int:
    found = re.search(r"removed (\d+) spool file", log)
    return int(found.group(1)) if found else 0


async def run_crash(options: Options, *, log: Any = sys.stderr) -> Report:
    rng = Random(options.seed)
    ledger = Ledger()
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="bench-crash-") as tmp:
        root = Path(tmp)
        spool = root / "spool"
        spool.mkdir()
        for name in FOREIGN_FILES:
            (spool / name).write_bytes(b"not the gateway's")
        config = write_config(root, options)
        previous: Round | None = None
        for number in range(options.rounds + 1):
            t0 = time.perf_counter()
            with gateway(root, config, number) as server:
                if previous is not None:
                    # The restart: nothing has been sent to this gateway yet.
                    previous.restart_seconds = time.perf_counter() - t0
                    previous.removed_at_start = removed_at_start(server.log())
                    previous.spool_after_start = len(spool_files(spool))
                    previous.foreign_removed = sum(
                        not (spool / name).exists() for name in FOREIGN_FILES
                    )
                    stored = check_store(root / "gateway.sqlite3", ledger, previous)
                    await check_corrections(server.url, stored, ledger, previous)
                    print(summary_line(previous), file=log, flush=True)
                if number == options.rounds:
                    break  # the last start only checks; start_server stops it with SIGTERM
                current = Round(number + 1)
                await load_and_kill(server.url, server.pid, options, ledger, current, rng)
                server.proc.wait()
                current.spool_left = len(spool_files(spool))
                rounds.append(current)
                previous = current
    return Report(rounds, machine())


def summary_line(r: Round) -> str:
    return (
        f"round {r.number}: kill at {r.kill_at:.2f} s, {r.streams_done} streams done,"
        f" {r.streams_cut} cut, {r.puts_answered} PUTs answered, {r.puts_cut} cut,"
        f" spool {r.spool_left} left -> {r.removed_at_start} removed -> {r.spool_after_start},"
        f" integrity {r.integrity}, {r.rows} rows, failures {r.failures}"
    )


def tables(report: Report) -> str:
    per_round = [
        [
            str(r.number),
            f"{r.kill_at:.2f}",
            str(r.streams_done),
            str(r.streams_cut),
            str(r.puts_answered),
            str(r.puts_cut),
            str(r.spool_left),
            str(r.removed_at_start),
            str(r.spool_after_start),
            r.integrity,
            str(len(r.incomplete_rows)),
            str(len(r.lost_transcripts)),
            str(len(r.lost_corrections)),
            f"{r.restart_seconds:.2f}",
        ]
        for r in report.rounds
    ]
    header = [
        "round",
        "kill at (s)",
        "streams done",
        "streams cut",
        "PUTs answered",
        "PUTs cut",
        "spool files left",
        "removed at start",
        "left after start",
        "integrity",
        "incomplete rows",
        "lost transcripts",
        "lost corrections",
        "restart (s)",
    ]
    restarts = [r.restart_seconds for r in report.rounds]
    summary = [
        ["kills (SIGKILL)", str(len(report.rounds))],
        [
            "streams completed / cut by a kill",
            f"{report.total('streams_done')} / {report.total('streams_cut')}",
        ],
        [
            "corrections answered / cut by a kill",
            f"{report.total('puts_answered')} / {report.total('puts_cut')}",
        ],
        ["integrity failures", str(report.integrity_failures)],
        ["incomplete transcript rows", str(report.total("incomplete_rows"))],
        ["lost transcripts (done sent, row missing)", str(report.total("lost_transcripts"))],
        ["lost corrections (PUT answered)", str(report.total("lost_corrections"))],
        ["spool files left by the kills", str(report.total("spool_left"))],
        ["leftover spool files after restart", str(report.total("spool_after_start"))],
        ["other programs' files removed", str(report.total("foreign_removed"))],
        ["client errors before a kill", str(report.total("client_errors"))],
        [
            "restart p50 / max (s)",
            f"{percentile(restarts, 50):.2f} / {max(restarts, default=0):.2f}",
        ],
    ]
    return "\n".join(
        [
            markdown_table("Crash rounds", header, per_round),
            markdown_table(
                "Crash safety: SIGKILL during streams and corrections", ["", "value"], summary
            ),
            "",
            report.machine,
        ]
    )


async def _main(options: Options) -> int:
    report = await run_crash(options)
    print(tables(report))
    for r in report.rounds:
        for problem in [
            *r.client_errors,
            *r.incomplete_rows,
            *r.lost_transcripts,
            *r.lost_corrections,
        ]:
            print(f"round {r.number}: {problem}", file=sys.stderr)
    return 1 if report.failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=Options.rounds)
    p.add_argument("--seed", type=int, default=Options.seed)
    p.add_argument("--streams", type=int, default=Options.streams)
    p.add_argument("--correctors", type=int, default=Options.correctors)
    args = p.parse_args(argv)
    options = Options(
        rounds=args.rounds, seed=args.seed, streams=args.streams, correctors=args.correctors
    )
    return trio.run(_main, options)


if __name__ == "__main__":
    sys.exit(main())
