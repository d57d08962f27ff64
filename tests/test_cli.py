"""The `gateway` command as a user runs it: a real `serve` process and the `transcribe` client."""

from __future__ import annotations

import os
import platform
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest
import trio
from audio_util import GOFORWARD
from conftest import GATEWAY_CLI, make_config, run_gateway, start_serve

pytestmark = pytest.mark.anyio


async def test_transcribe_client_prints_the_final_text(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with run_gateway(make_config(tmp_path)) as gw:
            result = await trio.run_process(
                [*GATEWAY_CLI, "transcribe", str(GOFORWARD), "--url", gw.url],
                capture_stdout=True,
                capture_stderr=True,
            )
    assert result.returncode == 0, result.stderr
    assert "forward" in result.stdout.decode()
    # Non-tty progress lines show current/total seconds.
    assert re.search(rb"\] +\d+\.\d/2\.8s", result.stderr)


async def test_transcribe_client_reports_http_errors(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with run_gateway(make_config(tmp_path)) as gw:
            result = await trio.run_process(
                [*GATEWAY_CLI, "transcribe", str(GOFORWARD), "--url", gw.url, "--engine", "nope"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert result.returncode == 1 and b"UNKNOWN_ENGINE" in result.stderr


async def test_serve_process_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "GATEWAY_STORE_PATH": str(tmp_path / "db.sqlite3")}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            gateway = await start_serve(nursery, env=env)
            async with httpx.AsyncClient(base_url=gateway.url) as c:
                assert (await c.get("/healthz")).status_code == 200
                assert (await c.get("/readyz")).json()["status"] == "ready"
            gateway.proc.send_signal(signal.SIGTERM)
            await gateway.read_output()
            assert await gateway.proc.wait() == 0


async def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "g.toml"
    bad.write_text("[server]\nbnid = 'x'\n")
    with trio.fail_after(30):
        result = await trio.run_process(
            [*GATEWAY_CLI, "serve", "--config", str(bad)], capture_stderr=True, check=False
        )
    assert result.returncode == 2 and b"bnid" in result.stderr


_ARENAS_PROBE = """
import ctypes, sys, threading
from gateway.cli import limit_malloc_arenas
applied = limit_malloc_arenas()
barrier = threading.Barrier(6)
def work():
    kept = [bytes(4000) for _ in range(100)]
    barrier.wait()  # all six alive at once: none can take over an exited thread's arena
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
print(applied, flush=True)
ctypes.CDLL(None).malloc_stats()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc arenas")
@pytest.mark.parametrize("env_value", ["", "8"])
async def test_serve_caps_glibc_malloc_arenas_unless_the_environment_says(env_value: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if env_value:
        env["MALLOC_ARENA_MAX"] = env_value
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-c", _ARENAS_PROBE], env=env, capture_stdout=True, capture_stderr=True
        )
    arenas = len(re.findall(rb"^Arena \d+:", result.stderr, re.MULTILINE))
    if env_value:
        assert result.stdout.strip() == b"False" and arenas > 2
    else:
        assert result.stdout.strip() == b"True" and 1 <= arenas <= 2


async def _store_migrate(config_file: Path) -> tuple[int, str, str]:
    result = await trio.run_process(
        [*GATEWAY_CLI, "store", "migrate", "--config", str(config_file)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_store_migrate_on_postgresql_prints_the_versions_and_refuses_a_newer_schema(
    tmp_path: Path, pg_url: str
) -> None:
    import psycopg

    from gateway.store_pg import PG_SCHEMA_VERSION, migrate

    with psycopg.connect(pg_url, autocommit=True) as conn:
        migrate(conn, 2)
    config = tmp_path / "gateway.toml"
    config.write_text(f'[store]\nurl = "{pg_url}"\n')
    with trio.fail_after(60):
        assert await _store_migrate(config) == (0, f"schema 2 -> {PG_SCHEMA_VERSION}\n", "")
        now = f"schema {PG_SCHEMA_VERSION} -> {PG_SCHEMA_VERSION}\n"
        assert await _store_migrate(config) == (0, now, "")
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE gateway_schema SET version = %s", (PG_SCHEMA_VERSION + 1,))
        code, out, err = await _store_migrate(config)
    assert (code, out) == (1, "")
    assert f"schema {PG_SCHEMA_VERSION + 1} is newer than this gateway ({PG_SCHEMA_VERSION})" in err


async def test_store_migrate_on_sqlite(tmp_path: Path) -> None:
    import sqlite3
    from contextlib import closing

    from gateway.store import SCHEMA_VERSION

    db = tmp_path / "db" / "g.sqlite3"
    config = tmp_path / "gateway.toml"
    config.write_text(f'[store]\npath = "{db}"\n')
    with trio.fail_after(60):
        assert await _store_migrate(config) == (0, f"schema 0 -> {SCHEMA_VERSION}\n", "")
        now = f"schema {SCHEMA_VERSION} -> {SCHEMA_VERSION}\n"
        assert await _store_migrate(config) == (0, now, "")
        with closing(sqlite3.connect(db)) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        code, out, err = await _store_migrate(config)
    assert (code, out) == (1, "") and "newer than this gateway" in err
