"""Logs: one access line per request with its fields and X-Request-ID, JSON or text formatting, and
nothing secret or private in them (no key, no transcript text, no query values)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from audio_util import GOFORWARD
from conftest import make_config, run_gateway, sse_events, start_serve, wait_until

from gateway.auth import add_key
from gateway.logs import JsonFormatter, TextFormatter

pytestmark = pytest.mark.anyio

# Words no log line may contain: they are only ever transcript text.
WORDS = ["zebra", "quokka", "narwhal"]
AUDIO = GOFORWARD.read_bytes()
STREAM = "/v1/transcriptions/stream"


def bearer(key: str, request_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "audio/wav"}
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    return headers


def access_lines(records: list[logging.LogRecord]) -> dict[str, dict[str, Any]]:
    return {
        r.request["request_id"]: r.request  # type: ignore[attr-defined]
        for r in records
        if r.name == "gateway.access"
    }


async def test_one_access_line_per_request_with_its_fields(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    keys = tmp_path / "keys.jsonl"
    _, key = add_key(keys, "acme")
    config = make_config(
        tmp_path,
        engines={
            "fake": {"kind": "scripted", "words": WORDS},
            "slow": {
                "kind": "scripted",
                "words": ["w"] * 30,
                "seconds_per_word": 0.1,
                "delay": 0.2,
            },
        },
        server={"default_engine": "fake", "keepalive": 0},
        auth={"keys_file": str(keys)},
    )
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            # A query value that could be secret must not reach the log.
            params = {"engine": "fake", "token": "hunter2"}
            async with c.stream(
                "POST", STREAM, params=params, content=AUDIO, headers=bearer(key, "req-1")
            ) as r:
                assert r.headers["x-request-id"] == "req-1"
                done = [e async for e in sse_events(r)][-1].data
            assert done["text"] == "zebra quokka narwhal"
            cached = await c.post("/v1/transcriptions", content=AUDIO, headers=bearer(key, "req-2"))
            assert cached.json()["cached"] is True
            # An id that is not one (spaces) is replaced by a generated one.
            odd = await c.get(f"/v1/transcriptions/{done['id']}", headers=bearer(key, "a b"))
            generated = odd.headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", generated)
            text = await c.get(
                f"/v1/transcriptions/{done['id']}",
                params={"format": "txt"},
                headers=bearer(key, "req-3"),
            )
            assert "zebra" in text.text
            refused = await c.get("/v1/models", headers={"X-Request-ID": "req-4"})
            assert refused.status_code == 401 and refused.headers["x-request-id"] == "req-4"
            empty = await c.post("/v1/transcriptions", content=b"", headers=bearer(key, "req-5"))
            assert empty.status_code == 400 and empty.headers["x-request-id"] == "req-5"
            health = await c.get("/healthz", headers={"X-Request-ID": "req-6"})
            assert health.headers["x-request-id"] == "req-6"
            async with c.stream(
                "POST",
                STREAM,
                params={"engine": "slow", "use_cache": "false"},
                content=AUDIO,
                headers=bearer(key, "req-7"),
            ) as r:
                events = sse_events(r)
                assert (await anext(events)).event == "transcription"
                await events.aclose()
            # The line of a stream is written when the stream has ended on the server too.
            await wait_until(lambda: len(access_lines(caplog.records)) == 8)
    lines = access_lines(caplog.records)
    assert sum(r.name == "gateway.access" for r in caplog.records) == 8
    assert set(lines) == {f"req-{i}" for i in range(1, 8)} | {generated}
    first = lines["req-1"]
    assert set(first) == {
        "request_id",
        "method",
        "path",
        "status",
        "client",
        "tenant",
        "engine",
        "outcome",
        "audio_seconds",
        "bytes_in",
        "duration_s",
        "ttfb_s",
    }
    assert first["method"] == "POST" and first["path"] == STREAM and first["status"] == 200
    assert first["client"] == "127.0.0.1" and first["tenant"] == "acme"
    assert first["engine"] == "fake" and first["outcome"] == "OK"
    assert first["audio_seconds"] == pytest.approx(2.8, abs=0.05)
    assert first["bytes_in"] == len(AUDIO)
    assert 0 <= first["ttfb_s"] <= first["duration_s"]
    assert lines["req-2"]["outcome"] == "CACHED" and lines["req-2"]["status"] == 200
    assert lines[generated]["outcome"] == "OK" and lines[generated]["engine"] == ""
    assert lines["req-4"] | {"duration_s": 0, "ttfb_s": 0} == {
        "request_id": "req-4",
        "method": "GET",
        "path": "/v1/models",
        "status": 401,
        "client": "127.0.0.1",
        "tenant": "",
        "engine": "",
        "outcome": "UNAUTHORIZED",
        "audio_seconds": None,
        "bytes_in": 0,
        "duration_s": 0,
        "ttfb_s": 0,
    }
    assert lines["req-5"]["status"] == 400 and lines["req-5"]["outcome"] == "EMPTY_FILE"
    assert lines["req-6"]["outcome"] == "OK" and lines["req-6"]["tenant"] == ""
    assert lines["req-7"]["status"] == 200 and lines["req-7"]["outcome"] == "DISCONNECTED"
    assert lines["req-7"]["engine"] == "slow"
    # Nothing the server logged is a key, transcript text or a query value (httpx, the client
    # here, logs its own URLs).
    server = [r for r in caplog.records if r.name.split(".")[0] in ("gateway", "hypercorn")]
    output = "\n".join(JsonFormatter().format(r) for r in server)
    for secret in (key, key.split("_", 2)[2], "hunter2", "Bearer", *WORDS):
        assert secret not in output


def test_json_and_text_formatters() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "a %s", ("b",), None)
        record.exc_info = sys.exc_info()
    record.request = {"request_id": "r1", "status": 500}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", out["ts"])
    assert (out["level"], out["logger"], out["message"]) == ("ERROR", "gateway.x", "a b")
    assert out["request"] == {"request_id": "r1", "status": 500}
    assert "ValueError: boom" in out["exc"]
    record.exc_info = None
    text = TextFormatter().format(record)
    assert text.endswith('ERROR gateway.x: a b request_id="r1" status=500')


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_serve_writes_access_lines_to_stderr(tmp_path: Path, fmt: str) -> None:
    keys = tmp_path / "keys.jsonl"
    _, key = add_key(keys, "acme")
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndefault_engine = "fake"\n[store]\npath = "{tmp_path / "db.sqlite3"}"\n'
        f'[auth]\nkeys_file = "{keys}"\n[log]\nformat = "{fmt}"\n'
        f'[engines.fake]\nkind = "scripted"\nwords = {json.dumps(WORDS)}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            gateway = await start_serve(nursery, "--config", str(config), env=env)
            async with httpx.AsyncClient(base_url=gateway.url) as c:
                ok = await c.post("/v1/transcriptions", content=AUDIO, headers=bearer(key, "one"))
                assert ok.json()["text"] == "zebra quokka narwhal"
                assert (await c.get("/v1/models")).status_code == 401
            gateway.proc.send_signal(signal.SIGTERM)
            output = (await gateway.read_output()).decode()
            assert await gateway.proc.wait() == 0
    lines = [line for line in output.splitlines() if not line.startswith("gateway: ")]
    if fmt == "json":
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        access = [r["request"] for r in records if r["logger"] == "gateway.access"]
        assert [(a["request_id"], a["status"], a["outcome"], a["tenant"]) for a in access[:1]] == [
            ("one", 200, "OK", "acme")
        ]
        assert len(access) == 2 and access[1]["status"] == 401
        assert any(r["logger"] == "hypercorn.error" for r in records)
    else:
        access = [line for line in lines if " gateway.access: " in line]
        assert len(access) == 2
        assert 'request_id="one"' in access[0] and "status=200" in access[0]
        assert 'tenant="acme"' in access[0] and 'outcome="OK"' in access[0]
        assert "status=401" in access[1] and 'outcome="UNAUTHORIZED"' in access[1]
    for secret in (key.split("_", 2)[2], *WORDS):
        assert secret not in output


async def test_a_client_that_leaves_mid_body_is_logged_499_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = make_config(
        tmp_path,
        engines={"fake": {"kind": "scripted", "words": WORDS}},
        server={"default_engine": "fake"},
    )
    with trio.fail_after(30):
        async with run_gateway(config) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as c:
                done = await c.post(
                    "/v1/transcriptions", content=AUDIO, headers={"content-type": "audio/wav"}
                )
            host, port = gw.url.removeprefix("http://").split(":")
            requests = {
                "upload": ("POST", STREAM, "audio/wav", AUDIO),
                "corrections": (
                    "PUT",
                    f"/v1/transcriptions/{done.json()['id']}/corrections",
                    "application/json",
                    b'{"segments": [{"start": 0, "end": 1, "text": "hello"}]}',
                ),
            }
            for request_id, (method, path, ctype, body) in requests.items():
                stream = await trio.open_tcp_stream(host, int(port))
                head = (
                    f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n\r\n"
                )
                await stream.send_all(head.encode() + body[: len(body) // 2])
                await stream.aclose()
            await wait_until(lambda: {"upload", "corrections"} <= set(access_lines(caplog.records)))
    lines = access_lines(caplog.records)
    for request_id in ("upload", "corrections"):
        assert lines[request_id]["status"] == 499
        assert lines[request_id]["outcome"] == "DISCONNECTED"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []
