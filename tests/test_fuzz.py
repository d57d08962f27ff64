"""Fuzzing every route, bounded: bench/fuzz.py's two fuzzers against a real ``gateway serve``.

- schemathesis on the gateway's own /openapi.json (a few hundred generated requests, positive and
  negative): no 5xx, every answer conforms to the document, every 4xx carries its API's coded
  error body, no hang;
- raw sockets: every hand-written malformed request of bench/fuzz.py (truncated multipart, bad
  boundaries and lengths, smuggling, non-UTF-8 and oversized headers, header floods, garbage
  audio) plus a few hundred random mutations: a coded 4xx or a clean close each, no hang;
- the server's log afterwards: no traceback, no INTERNAL_ERROR, no 5xx.

Then the fixes the fuzzers led to, each on its own: hypercorn's own answers to requests it cannot
frame are coded 4xx (never an empty 400 or a 501), and a response written while hypercorn closes
the connection no longer ends the server.

The full run (10,000 schemathesis requests) is ``python bench/fuzz.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import make_config, run_gateway

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from fuzz import RAW_CASES, RawCase, Tally, _exchange, coded_error, fuzz_gateway

pytestmark = pytest.mark.anyio

# The CI share of the bench's 10,000: about 25 s of schemathesis and 20 s of raw sockets on 2 cores.
SCHEMA_REQUESTS = 400
RAW_REQUESTS = 300


def _clean(tally: Tally) -> None:
    assert tally.failures == 0, tally.examples()


async def test_fuzzing_every_route_finds_no_5xx_no_uncoded_4xx_no_hang() -> None:
    with trio.fail_after(240):
        results = await trio.to_thread.run_sync(
            lambda: fuzz_gateway(SCHEMA_REQUESTS, RAW_REQUESTS, seed=1, progress=lambda _: None)
        )
    schema, raw = results["schemathesis"], results["raw sockets"]
    assert schema.requests == SCHEMA_REQUESTS
    assert raw.requests == len(RAW_CASES) + RAW_REQUESTS
    _clean(schema)
    _clean(raw)
    # The fuzzers got past the front door: successes, refusals and (raw) closes all happened.
    assert schema.statuses["2xx"] > 0 and schema.statuses["4xx"] > 0
    assert raw.statuses["4xx"] > 0 and raw.statuses["closed"] > 0


def _config(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_config(
        tmp_path,
        server={"default_engine": "scripted", "body_timeout": 2.0},
        engines={"scripted": {"kind": "scripted"}},
    )


def _case(name: str) -> RawCase:
    return next(case for case in RAW_CASES if case.name == name)


@pytest.mark.parametrize(
    ("name", "status", "code"),
    [
        ("Content-Length b'abc' /v1/transcriptions", 400, "MALFORMED_REQUEST"),
        ("two Content-Lengths /asr/transcribe", 400, "MALFORMED_REQUEST"),
        ("Transfer-Encoding gzip /v1/transcriptions", 400, "MALFORMED_REQUEST"),  # h11: 501
        ("bad chunk size /asr/transcribe/stream", 400, "MALFORMED_REQUEST"),
        ("oversized header /v1/transcriptions", 431, "HEADERS_TOO_LARGE"),
        ("header flood /asr/transcribe", 431, "HEADERS_TOO_LARGE"),
        ("malformed b'GET /healthz\\r\\n\\r\\n'", 400, "MALFORMED_REQUEST"),
        (
            "malformed b'\\x16\\x03\\x01\\x02\\x00\\x01\\x00\\x01\\xfc\\x03\\x03'",
            400,
            "MALFORMED_REQUEST",
        ),
    ],
)
async def test_a_request_the_server_cannot_frame_gets_a_coded_4xx_in_every_apis_shape(
    tmp_path: Path, name: str, status: int, code: str
) -> None:
    case = _case(name)
    with trio.fail_after(30):
        async with run_gateway(_config(tmp_path)) as gw:
            host, port = gw.url.removeprefix("http://").rsplit(":", 1)
            answer = await _exchange(host, int(port), case)
    assert answer.status == status and answer.complete
    body = json.loads(answer.body)
    # The API is unknown before the request is parsed: the body is every API's shape at once.
    assert body["code"] == body["error"]["code"] == code
    assert body["detail"] and body["error"]["detail"] == body["error"]["message"] == body["detail"]
    for path in ("/v1/transcriptions", "/v1/audio/transcriptions", "/asr/transcribe"):
        assert coded_error(path, answer.content_type, answer.body) is None


async def test_hypercorn_closes_a_connection_only_between_two_writes(tmp_path: Path) -> None:
    # Hypercorn's close shut the socket's write side without the connection's send lock, and
    # trio's send_eof holds the socket's send guard across a checkpoint: a response written at
    # that moment (the app's answer to a client that half-closed mid-body, or hypercorn's own error
    # answer) failed with BusyResourceError, which in hypercorn's reader task ended the server (the
    # raw fuzzer's mutated uploads found it). The close must wait for a write in progress.
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio.tcp_server import TCPServer

    from gateway.server import hypercorn_config

    hypercorn_config(_config(tmp_path))  # installs the gateway's hypercorn fixes
    ours, theirs = trio.socket.socketpair()
    server = TCPServer(None, HypercornConfig(), None, None, trio.SocketStream(ours))  # type: ignore[arg-type]
    peer = trio.SocketStream(theirs)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with server.send_lock:  # a write in progress
                nursery.start_soon(server._close)
                await trio.testing.wait_all_tasks_blocked()
                # The close waits for the lock: the socket is still open for writing.
                assert server.send_lock.statistics().tasks_waiting == 1
                await server.stream.send_all(b"the rest of a response")
            assert await peer.receive_some() == b"the rest of a response"
            assert await peer.receive_some() == b""  # closed once the write was over
    await peer.aclose()
