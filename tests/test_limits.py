"""Slow-loris limits on a real hypercorn, driven by raw trio sockets on loopback:
``server.header_timeout`` (hypercorn's idle timer) and ``server.body_timeout`` (the gateway's
per-chunk body deadline, 408 REQUEST_TIMEOUT) on every route that reads a body, the up-front
refusal of an oversize declared length, plus how hypercorn.toml maps onto them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from audio_util import GOFORWARD, LIBRIVOX
from conftest import collect, make_config, run_gateway, wait_until

from gateway.api.common import MAX_JSON_BYTES
from gateway.audio import SPOOL_BATCH_BYTES
from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.server import hypercorn_config
from gateway.store import content_uuid

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent
STREAM = "/v1/transcriptions/stream"


def engines(**kw: object) -> dict[str, object]:
    return {"fake": {"kind": "scripted", **kw}}


def limits(tmp_path: Path, **server: object) -> dict[str, object]:
    (tmp_path / "spool").mkdir(exist_ok=True)
    return {"default_engine": "fake", "spool_dir": str(tmp_path / "spool"), **server}


async def connect(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").split(":")
    return await trio.open_tcp_stream(host, int(port))


async def read_all(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


async def test_headers_that_trickle_in_are_cut_at_header_timeout(tmp_path: Path) -> None:
    config = make_config(tmp_path, server=limits(tmp_path, header_timeout=0.5), engines=engines())
    with trio.fail_after(20):
        async with run_gateway(config) as gw:
            stream = await connect(gw.url)
            sent = 0
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    # One header line every 50 ms: always busy, never finished.
                    nonlocal sent
                    await stream.send_all(f"POST {STREAM} HTTP/1.1\r\nHost: x\r\n".encode())
                    try:
                        while True:
                            await stream.send_all(f"X-Slow-{sent}: y\r\n".encode())
                            sent += 1
                            await trio.sleep(0.05)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

                nursery.start_soon(trickle)
                # Well under hypercorn's own 5 s default: it is header_timeout that acts.
                with trio.fail_after(4):
                    received = await read_all(stream)
                nursery.cancel_scope.cancel()
            await stream.aclose()
            # The connection is usable again for a client that sends its request at once.
            async with httpx.AsyncClient(base_url=gw.url) as c:
                assert (await c.get("/healthz")).status_code == 200
    # Closed without a response, while the client was still sending header lines.
    assert received == b""
    assert sent > 1


async def test_a_stream_outlives_header_timeout(tmp_path: Path) -> None:
    # The idle timer stops once the headers are in: a stream may run far longer than it.
    config = make_config(
        tmp_path,
        server=limits(tmp_path, header_timeout=0.2, keepalive=0),
        engines=engines(words=["a", "b", "c"], seconds_per_word=1.0, delay=0.3),
    )
    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            files = {"file": (GOFORWARD.name, GOFORWARD.read_bytes(), "audio/wav")}
            async with c.stream("POST", STREAM, files=files) as r:
                assert r.status_code == 200
                events = await collect(r)
    assert [e.event for e in events][-1] == "done"
    assert events[-1].data["text"] == "a b c"
    assert len([e for e in events if e.event == "transcription"]) >= 3


async def test_a_stalled_body_gets_408_and_its_spool_file_is_removed(tmp_path: Path) -> None:
    config = make_config(tmp_path, server=limits(tmp_path, body_timeout=0.5), engines=engines())
    spool = tmp_path / "spool"
    body = GOFORWARD.read_bytes()
    stalled = LIBRIVOX.read_bytes()
    with trio.fail_after(20):
        async with run_gateway(config) as gw:
            stream = await connect(gw.url)
            head = (
                f"POST {STREAM} HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                f"Content-Length: {len(stalled)}\r\n\r\n"
            )
            # More than one spool batch, so the spool file exists.
            assert len(stalled) > SPOOL_BATCH_BYTES + 65536
            await stream.send_all(head.encode() + stalled[: SPOOL_BATCH_BYTES + 65536])
            # The upload is being spooled...
            await wait_until(lambda: any(spool.iterdir()))
            # ...and then the client stalls, connection open.
            response = await read_all(stream)
            await stream.aclose()
            # Still serving: the same upload sent at once is transcribed.
            async with httpx.AsyncClient(base_url=gw.url) as c:
                ok = await c.post(
                    "/v1/transcriptions", content=body, headers={"content-type": "audio/wav"}
                )
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 "
    payload = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert payload["error"]["code"] == "REQUEST_TIMEOUT"
    assert ok.status_code == 200 and ok.json()["text"] == "hello world"
    assert list(spool.iterdir()) == []


async def test_a_slow_but_steady_body_is_accepted(tmp_path: Path) -> None:
    # body_timeout bounds the gap between pieces, not the whole upload: 12 pieces 0.1 s apart
    # take longer than body_timeout in all and still go through.
    config = make_config(tmp_path, server=limits(tmp_path, body_timeout=0.5), engines=engines())
    body = GOFORWARD.read_bytes()

    async def slowly() -> AsyncIterator[bytes]:
        step = -(-len(body) // 12)
        for i in range(0, len(body), step):
            yield body[i : i + step]
            await trio.sleep(0.1)

    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            r = await c.post(
                "/v1/transcriptions", content=slowly(), headers={"content-type": "audio/wav"}
            )
    assert r.status_code == 200
    assert r.json()["text"] == "hello world"


def test_shipped_hypercorn_toml_and_our_timeouts(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "GATEWAY_SERVER_HYPERCORN_CONFIG": str(ROOT / "config" / "hypercorn.toml"),
            "GATEWAY_SERVER_HEADER_TIMEOUT": "7",
        }
    )
    hc = hypercorn_config(config)
    assert hc.keep_alive_timeout == 7 and hc.ssl_handshake_timeout == 7
    assert hc.read_timeout is None
    assert hc.h11_max_incomplete_size == 16384 and hc.graceful_timeout == 10
    assert hc.alpn_protocols == ["h2", "http/1.1"]


@pytest.mark.parametrize("key", ["keep_alive_timeout", "ssl_handshake_timeout", "read_timeout"])
def test_hypercorn_toml_may_not_override_our_timeouts(tmp_path: Path, key: str) -> None:
    path = tmp_path / "hypercorn.toml"
    path.write_text(f"{key} = 99\n")
    config = load_config(environ={"GATEWAY_SERVER_HYPERCORN_CONFIG": str(path)})
    with pytest.raises(ConfigError, match=key):
        hypercorn_config(config)


def error_code(response: bytes) -> tuple[bytes, str]:
    """The status line and the machine-readable code of a raw HTTP error response, whatever
    the API's shape (``{"error": {"code"}}`` or ``{"code"}``)."""
    status_line, _, rest = response.partition(b"\r\n")
    payload = json.loads(rest.partition(b"\r\n\r\n")[2])
    code = payload["error"]["code"] if "error" in payload else payload["code"]
    return status_line, code.upper()


async def body_routes(url: str) -> list[tuple[str, str, str]]:
    """(method, path, content type) of every route that reads a body, on a stored transcript."""
    async with httpx.AsyncClient(base_url=url) as c:
        done = await c.post(
            "/v1/transcriptions",
            content=GOFORWARD.read_bytes(),
            headers={"content-type": "audio/wav"},
        )
    id = done.json()["id"]
    return [
        ("POST", "/v1/transcriptions", "audio/wav"),
        ("POST", STREAM, "audio/wav"),
        ("POST", "/v1/audio/transcriptions", "audio/wav"),
        ("POST", "/asr/transcribe", "audio/wav"),
        ("POST", "/asr/transcribe/stream", "audio/wav"),
        ("PUT", f"/v1/transcriptions/{id}/corrections", "application/json"),
        ("POST", f"/asr/validation/document/{content_uuid(id)}", "application/json"),
    ]


async def raw_answers(config: Config, length: int, sent: bytes, bound: float) -> list[bytes]:
    """Each body route's raw answer to a request declaring ``length`` bytes and sending ``sent``
    (then waiting, connection open), each bounded by ``bound`` seconds."""
    answers = []
    async with run_gateway(config) as gw:
        for method, path, ctype in await body_routes(gw.url):
            stream = await connect(gw.url)
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {length}\r\n\r\n"
            )
            await stream.send_all(head.encode() + sent)
            with trio.fail_after(bound):
                answers.append(await read_all(stream))
            await stream.aclose()
    return answers


@pytest.mark.parametrize(
    ("length", "body_timeout", "status", "code"),
    [
        # The declared length alone decides: 2 bytes of 93 GiB, and no waiting for the rest.
        (99_999_999_999, 30.0, b"HTTP/1.1 413 ", "PAYLOAD_TOO_LARGE"),
        # A length within bounds, and then the client stalls.
        (100, 0.3, b"HTTP/1.1 408 ", "REQUEST_TIMEOUT"),
    ],
)
async def test_every_body_route_shares_one_reader_and_its_limits(
    tmp_path: Path, length: int, body_timeout: float, status: bytes, code: str
) -> None:
    config = make_config(
        tmp_path, server=limits(tmp_path, body_timeout=body_timeout), engines=engines()
    )
    with trio.fail_after(30):
        answers = await raw_answers(config, length, b"[{", bound=3)
    assert len(answers) == 7
    for response in answers:
        assert error_code(response) == (status, code), response


async def test_a_json_body_is_cut_at_its_limit_whatever_its_framing(tmp_path: Path) -> None:
    # Chunked: no length to refuse up front, so the reader counts.
    config = make_config(tmp_path, server=limits(tmp_path), engines=engines())

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(MAX_JSON_BYTES // 65536 + 2):
            yield b" " * 65536

    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            routes = [r for r in await body_routes(gw.url) if r[2] == "application/json"]
            answers = [
                await c.request(method, path, content=chunked(), headers={"content-type": ctype})
                for method, path, ctype in routes
            ]
    assert [r.status_code for r in answers] == [413, 413]
    assert answers[0].json()["error"]["code"] == answers[1].json()["code"] == "PAYLOAD_TOO_LARGE"
