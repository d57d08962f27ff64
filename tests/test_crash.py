"""Crash safety: spool files of killed gateways are removed at start-up (and only those), and a
short run of bench/crash.py: SIGKILL during streams and corrections loses nothing.

The gateways are real ``gateway serve`` subprocesses on 127.0.0.1, with the scripted engine.
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from conftest import ServeProcess, start_serve, wait_until
from crash import Options, run_crash
from fakes.wlk_server import wav_bytes

from gateway import audio
from gateway.audio import SPOOL_BATCH_BYTES, SPOOL_PREFIX, receive_upload, sweep_spool

pytestmark = pytest.mark.anyio

# Not the gateway's: names of other programs' temporary files, one of them the name older
# gateways gave their spool files.
FOREIGN = ("upload-abc123.bin", "asr-gateway-notes.txt", "tmpq1w2e3")


def silent_wav(seconds: float) -> bytes:
    return wav_bytes(b"\0\0" * int(seconds * 16_000))


def gateway_config(tmp_path: Path, name: str, spool: Path) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[server]\ndefault_engine = "s"\nspool_dir = "{spool}"\nshutdown_grace = 0.5\n'
        f'[store]\npath = "{tmp_path / name}.sqlite3"\n'
        '[engines.s]\nkind = "scripted"\nwords = ["a", "b", "c"]\n'
    )
    return str(path)


def spool_files(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.iterdir() if p.name.startswith(SPOOL_PREFIX))


class StalledUpload:
    """A raw HTTP/1.1 upload that sends more than one spool batch and then waits, so the gateway
    holds a spool file for it."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent = SPOOL_BATCH_BYTES + 65536
        self.stream: trio.SocketStream | None = None

    async def start(self, gateway: ServeProcess, spool: Path) -> str:
        before = set(spool_files(spool))
        host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
        self.stream = await trio.open_tcp_stream(host, int(port))
        head = (
            f"POST /v1/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
            f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n"
        )
        await self.stream.send_all(head.encode() + self.body[: self.sent])
        await wait_until(lambda: len(set(spool_files(spool)) - before) == 1)
        (name,) = set(spool_files(spool)) - before
        return name

    async def finish(self) -> bytes:
        assert self.stream is not None
        await self.stream.send_all(self.body[self.sent :])
        response = bytearray()
        while chunk := await self.stream.receive_some():
            response += chunk
        await self.stream.aclose()
        return bytes(response)

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


async def test_start_up_removes_dead_gateways_spool_files_and_nothing_else(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    for name in FOREIGN:
        (spool / name).write_bytes(b"someone else's")
    # Left by a gateway that is gone: named as the gateway's, and nobody holds its lock.
    (spool / f"{SPOOL_PREFIX}dead.bin").write_bytes(b"RIFF")
    body = silent_wav(20)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            a = await start_serve(nursery, "--config", gateway_config(tmp_path, "a", spool))
            assert b"removed 1 spool file" in a.output
            assert spool_files(spool) == []

            # A second gateway starting on the same spool directory keeps the first's live file.
            live = StalledUpload(body)
            name = await live.start(a, spool)
            b = await start_serve(nursery, "--config", gateway_config(tmp_path, "b", spool))
            assert b"removed" not in b.output
            assert spool_files(spool) == [name]
            response = await live.finish()
            assert response.startswith(b"HTTP/1.1 200 ")
            assert b'"text":"a b c"' in response
            await wait_until(lambda: spool_files(spool) == [])

            # Killed mid-upload, the first gateway leaves its file; the next start removes it.
            cut = StalledUpload(body)
            name = await cut.start(a, spool)
            a.proc.kill()
            await a.proc.wait()
            await cut.aclose()
            assert spool_files(spool) == [name]
            c = await start_serve(nursery, "--config", gateway_config(tmp_path, "c", spool))
            assert b"removed 1 spool file" in c.output
            assert spool_files(spool) == []

            # The gateways still serve, and spool as before.
            async with httpx.AsyncClient(base_url=c.url) as client:
                ok = await client.post(
                    "/v1/transcriptions", content=body, headers={"content-type": "audio/wav"}
                )
            assert ok.status_code == 200 and ok.json()["text"] == "a b c"
            for p in (b, c):
                p.proc.terminate()
    assert sorted(p.name for p in spool.iterdir()) == sorted(FOREIGN)


async def test_a_sweep_between_creating_and_locking_a_spool_file_loses_no_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another gateway's start-up sweep can find a new spool file before its writer has locked
    it, and remove it; the writer must notice and spool to a new file."""
    real_flock = fcntl.flock
    swept: list[int] = []

    def flock_after_a_sweep(fd: Any, operation: int) -> None:
        if operation == fcntl.LOCK_EX and not swept:  # the writer's first, blocking lock
            swept.append(sweep_spool(str(tmp_path)))
        real_flock(fd, operation)

    monkeypatch.setattr(audio.fcntl, "flock", flock_after_a_sweep)
    data = silent_wav(1)

    async def body() -> Any:
        yield data

    with trio.fail_after(10):
        upload = await receive_upload(
            "audio/wav", None, body(), max_bytes=10**7, spool_dir=str(tmp_path)
        )
        try:
            assert swept == [1]  # the first file was taken for a dead gateway's
            assert Path(upload.path).read_bytes() == data
            # The upload's file is locked now: a sweep leaves it alone.
            assert sweep_spool(str(tmp_path)) == 0
            assert Path(upload.path).exists()
        finally:
            await upload.aclose()
    assert list(tmp_path.iterdir()) == []


async def test_sweeping_a_missing_spool_directory_removes_nothing(tmp_path: Path) -> None:
    assert sweep_spool(str(tmp_path / "missing")) == 0


async def test_sigkill_during_streams_and_corrections_loses_nothing() -> None:
    """bench/crash.py, 5 rounds: after each SIGKILL the restarted gateway finds an intact store,
    no incomplete row, every answered correction, and no spool file of the killed one."""
    with trio.fail_after(90):
        report = await run_crash(Options(rounds=5, seed=7, streams=4, correctors=2))
    problems = [
        p
        for r in report.rounds
        for p in [*r.client_errors, *r.incomplete_rows, *r.lost_transcripts, *r.lost_corrections]
    ]
    assert problems == []
    assert len(report.rounds) == 5
    assert report.integrity_failures == 0
    assert report.total("spool_after_start") == 0 and report.total("foreign_removed") == 0
    # The kills hit work in progress: streams and spool files were cut, corrections answered.
    assert all(r.streams_cut > 0 and r.spool_left > 0 for r in report.rounds)
    assert all(r.removed_at_start == r.spool_left for r in report.rounds)
    assert report.total("puts_answered") > 0 and report.total("streams_done") > 0
    assert report.failures == 0
