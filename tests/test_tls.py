"""The gateway serving TLS itself (server.certfile/keyfile, with the shipped hypercorn.toml): h2
chosen by ALPN, HTTP/1.1 for clients that offer only it, SSE over both; h2c by Upgrade on plain
TCP (h2c with prior knowledge is test_api.py::test_http2_prior_knowledge)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio
import trustme
from audio_util import GOFORWARD
from conftest import Gateway, collect, make_config, run_gateway

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent
STREAM = "/v1/transcriptions/stream"


@asynccontextmanager
async def tls_gateway(
    tmp_path: Path, **server: object
) -> AsyncIterator[tuple[Gateway, ssl.SSLContext]]:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    config = make_config(
        tmp_path,
        server={
            "default_engine": "fake",
            "certfile": str(cert),
            "keyfile": str(key),
            "hypercorn_config": str(ROOT / "config" / "hypercorn.toml"),
            **server,
        },
        engines={"fake": {"kind": "scripted", "words": ["one", "two", "three"]}},
    )
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with run_gateway(config) as gw:
        assert gw.url.startswith("https://127.0.0.1:")
        yield gw, client


def upload() -> dict[str, tuple[str, bytes, str]]:
    return {"file": (GOFORWARD.name, GOFORWARD.read_bytes(), "audio/wav")}


@pytest.mark.parametrize(("http2", "version"), [(True, "HTTP/2"), (False, "HTTP/1.1")])
async def test_sse_over_tls_with_the_alpn_chosen_protocol(
    tmp_path: Path, http2: bool, version: str
) -> None:
    # httpx offers ["h2", "http/1.1"] with http2=True and only ["http/1.1"] otherwise.
    with trio.fail_after(30):
        async with (
            tls_gateway(tmp_path) as (gw, tls),
            httpx.AsyncClient(base_url=gw.url, http2=http2, verify=tls) as c,
        ):
            async with c.stream("POST", STREAM, files=upload()) as r:
                assert r.http_version == version and r.status_code == 200
                events = await collect(r)
            health = await c.get("/healthz")
    assert health.http_version == version
    assert [e.event for e in events][-1] == "done"
    assert events[-1].data["text"] == "one two three"
    assert any(e.event == "transcription" for e in events)


@pytest.mark.parametrize(
    ("offered", "selected"),
    [(["h2", "http/1.1"], "h2"), (["http/1.1", "h2"], "h2"), (["http/1.1"], "http/1.1")],
)
async def test_alpn_offers_h2_and_http11(tmp_path: Path, offered: list[str], selected: str) -> None:
    with trio.fail_after(30):
        async with tls_gateway(tmp_path) as (gw, tls):
            tls.set_alpn_protocols(offered)
            port = int(gw.url.rsplit(":", 1)[1])
            stream = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", port), tls, server_hostname="127.0.0.1"
            )
            await stream.do_handshake()
            chosen = stream.selected_alpn_protocol()
            await stream.aclose()
    assert chosen == selected


async def test_a_silent_tls_client_is_dropped_after_header_timeout(tmp_path: Path) -> None:
    # The handshake shares the header allowance (hypercorn's own default would be 60 s).
    with trio.fail_after(30):
        async with tls_gateway(tmp_path, header_timeout=0.5) as (gw, _):
            tcp = await trio.open_tcp_stream("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
            with trio.fail_after(10):
                received = await tcp.receive_some()
            await tcp.aclose()
    assert received == b""


async def test_h2c_by_upgrade_on_plain_tcp(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, server={"default_engine": "fake"}, engines={"fake": {"kind": "scripted"}}
    )
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection()
    with trio.fail_after(30):
        async with run_gateway(config) as gw:
            host, port = gw.url.removeprefix("http://").split(":")
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(
                b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n"
            )
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some()
            head, _, rest = data.partition(b"\r\n\r\n")
            # The upgraded request is stream 1; its answer comes as HTTP/2 frames.
            await stream.send_all(conn.data_to_send())
            status, body, ended = None, b"", False
            while not ended:
                for event in conn.receive_data(rest):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = dict(event.headers)[b":status"]
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(len(event.data), event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                await stream.send_all(conn.data_to_send())
                rest = b"" if ended else await stream.receive_some()
            await stream.aclose()
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 101 "
    assert b"upgrade: h2c" in head.lower()
    assert status == b"200" and body == b'{"status":"ok"}'
