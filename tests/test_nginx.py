"""The shipped config/nginx.conf, run for real in front of a real gateway on loopback.

How the shipped file is rendered and started (tests/nginx_proxy.py): only what a test must change
is swapped in, and every substitution must match, so the test follows the shipped file. Clients
connect from 127.0.0.2, so that "the client's address" and "nginx's address" (127.0.0.1) differ.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from audio_util import GOFORWARD
from conftest import SSE, Gateway, make_config, run_gateway, sse_events, wait_until
from nginx_proxy import CLIENT_ADDRESS, SHIPPED, Nginx, run_nginx
from test_live import open_websocket_url, receive_all, send_audio

from gateway.admission import Lease
from gateway.config import ScriptedConfig
from gateway.engines.base import Session, SessionOptions
from gateway.engines.scripted import ScriptedEngine

pytestmark = pytest.mark.anyio

STREAM = "/v1/transcriptions/stream"


# --- the gateway side ----------------------------------------------------------------------


@dataclass
class ScopeSpy:
    """ASGI middleware, inside the proxy fix: what the app sees of each HTTP request."""

    app: Any = None
    seen: list[dict[str, Any]] = field(default_factory=list)
    body_bytes: int = 0

    def wrap(self, app: Any) -> ScopeSpy:
        self.app = app
        return self

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.seen.append(
            {
                "path": scope["path"],
                "client": scope["client"][0],
                "scheme": scope["scheme"],
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
            }
        )

        async def counting_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.body_bytes += len(message.get("body", b""))
            return message

        return await self.app(scope, counting_receive, send)


class GatedEngine(ScriptedEngine):
    """A scripted engine whose final result waits for ``gate``: ``done`` cannot exist before the
    test allows it, so "the first event arrived before done" needs no clock."""

    def __init__(self, config: ScriptedConfig) -> None:
        super().__init__("gated", config)
        self.gate = trio.Event()

    @asynccontextmanager
    async def open_session(self, options: SessionOptions, lease: Lease) -> AsyncIterator[Session]:
        async with super().open_session(options, lease) as session:
            end_audio = session.end_audio

            async def gated_end_audio() -> None:
                await self.gate.wait()
                await end_audio()

            session.end_audio = gated_end_audio  # type: ignore[method-assign]
            yield session


def gated(gw: Gateway, **kw: Any) -> GatedEngine:
    engine = GatedEngine(ScriptedConfig(**kw))
    gw.state.engines["gated"] = engine
    return engine


def gateway_config(tmp_path: Path, **server: Any) -> Any:
    return make_config(
        tmp_path,
        server={"default_engine": "fake", **server},
        engines={"fake": {"kind": "scripted"}},
    )


@dataclass
class Proxied:
    gateway: Gateway
    nginx: Nginx
    client: httpx.AsyncClient
    engine: GatedEngine


@asynccontextmanager
async def behind_nginx(
    tmp_path: Path, *, http2: bool = True, extra: str = "", wrap: Any = None, **server: Any
) -> AsyncIterator[Proxied]:
    """A gateway (with a gated engine) behind the shipped nginx, and a client of nginx."""
    async with (
        run_gateway(gateway_config(tmp_path, **server), wrap=wrap) as gw,
        run_nginx(tmp_path, gw.url, extra=extra) as nginx,
        nginx.client(http2=http2) as client,
    ):
        yield Proxied(gw, nginx, client, gated(gw, **WORDS))


def upload() -> dict[str, tuple[str, bytes, str]]:
    return {"file": (GOFORWARD.name, GOFORWARD.read_bytes(), "audio/wav")}


async def next_event(events: AsyncIterator[SSE]) -> SSE:
    """The next event that is not a comment."""
    while (event := await anext(events)).event == "comment":
        pass
    return event


WORDS = {"words": ["one", "two", "three"], "seconds_per_word": 0.5}


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.nginx
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
async def test_sse_passes_through_unbuffered(tmp_path: Path, http2: bool) -> None:
    # The gateway's X-Accel-Buffering: no is ignored here, so it is the config's own
    # proxy_buffering off that is tested (with buffering, HTTP/1.1 clients get nothing until the
    # response ends, and this test hangs).
    ignore = "    proxy_ignore_headers X-Accel-Buffering;\n"
    with trio.fail_after(30):
        async with behind_nginx(tmp_path, http2=http2, extra=ignore, keepalive=0.2) as p:
            c = p.client
            engine = p.engine
            async with (
                c.stream("POST", STREAM, params={"engine": "gated"}, files=upload()) as r,
                aclosing(sse_events(r)) as events,
            ):
                assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                assert r.status_code == 200
                first = await next_event(events)
                # Only now can the engine finish: a buffering proxy would never have let
                # this event through, and the test would hang instead.
                assert engine.active == 1 and engine.closed == 0
                engine.gate.set()
                rest = [e async for e in events]
    assert first.event == "transcription"
    assert rest[-1].event == "done" and rest[-1].data["text"] == "one two three"


@pytest.mark.nginx
async def test_upload_streams_through_to_the_gateway(tmp_path: Path) -> None:
    spy = ScopeSpy()
    body = GOFORWARD.read_bytes()
    half = len(body) // 2
    with trio.fail_after(30):
        async with behind_nginx(tmp_path, wrap=spy.wrap) as p:
            c = p.client

            async def content() -> AsyncIterator[bytes]:
                yield body[:half]
                # The gateway is reading the body while the client still holds its second half:
                # with request buffering, nginx would wait for the end and this would hang.
                await wait_until(lambda: spy.body_bytes >= half)
                yield body[half:]

            r = await c.post(
                "/v1/transcriptions",
                params={"engine": "fake"},
                content=content(),
                headers={"content-type": "audio/wav"},
            )
    assert r.http_version == "HTTP/2" and r.status_code == 200
    assert r.json()["text"] == "hello world"
    assert spy.body_bytes == len(body)


@pytest.mark.nginx
async def test_keepalives_hold_a_silent_stream_past_proxy_read_timeout(tmp_path: Path) -> None:
    # nginx gives up after 1 s without a byte from the gateway. The engine's updates come at once,
    # then it is silent until 12 keepalive comments (one per 0.2 s of silence, so >= 2.4 s) have
    # reached the client through nginx; only then may it finish.
    with trio.fail_after(30):
        async with behind_nginx(tmp_path, keepalive=0.2) as p:
            c = p.client
            engine = p.engine
            labels: list[str] = []
            async with (
                c.stream("POST", STREAM, params={"engine": "gated"}, files=upload()) as r,
                aclosing(sse_events(r)) as events,
            ):
                async for e in events:
                    labels.append(e.data if e.event == "comment" else e.event)
                    if labels[-12:] == ["keepalive"] * 12:
                        engine.gate.set()
    assert engine.gate.is_set()
    assert labels[0] == "transcription" and labels[-1] == "done"
    assert labels.count("done") == 1 and "error" not in labels


@pytest.mark.nginx
async def test_without_keepalives_nginx_cuts_a_silent_stream(tmp_path: Path) -> None:
    # The control for the test above: the same silence with keepalive = 0 ends at nginx's
    # proxy_read_timeout, and the gateway sees the disconnect and closes the engine session.
    with trio.fail_after(30):
        async with behind_nginx(tmp_path, http2=False, keepalive=0) as p:
            c = p.client
            engine = p.engine
            seen: list[str] = []
            with pytest.raises(httpx.RemoteProtocolError):
                async with c.stream(
                    "POST", STREAM, params={"engine": "gated"}, files=upload()
                ) as r:
                    async for e in sse_events(r):
                        seen.append(e.event)
            await engine.wait_closed(1)
    assert "transcription" in seen and "done" not in seen
    assert "upstream timed out" in (tmp_path / "nginx" / "error.log").read_text()


@pytest.mark.nginx
@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
async def test_client_leaving_at_the_proxy_cancels_the_engine_session(
    tmp_path: Path, http2: bool
) -> None:
    with trio.fail_after(30):
        async with (
            run_gateway(gateway_config(tmp_path, keepalive=0.2)) as gw,
            run_nginx(tmp_path, gw.url) as nginx,
        ):
            engine = gated(gw, **WORDS)
            async with (
                nginx.client(http2=http2) as c,
                c.stream("POST", STREAM, params={"engine": "gated"}, files=upload()) as r,
                aclosing(sse_events(r)) as events,
            ):
                assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
                first = await next_event(events)
                assert engine.active == 1
            # The client has closed its connection to nginx. The gate was never opened, so only
            # the cancellation nginx passes on can have closed the session.
            await engine.wait_closed(1)
            assert engine.active == 0 and not engine.gate.is_set()
    assert first.event == "transcription"


def access_log(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """request id -> client, from the gateway's access lines."""
    return {
        r.request["request_id"]: r.request["client"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "gateway.access"
    }


@pytest.mark.nginx
async def test_a_live_websocket_passes_through_and_outlives_proxy_read_timeout(
    tmp_path: Path,
) -> None:
    """GET /v1/transcriptions/live through nginx over TLS: the upgrade passes on, the audio
    streams in while the gateway's pings keep the socket past the test's 1 s
    proxy_read_timeout, and the transcript it stores is read back through nginx."""
    config = make_config(
        tmp_path,
        server={"default_engine": "s", "keepalive": 0.2, "trusted_hops": 1},
        engines={"s": {"kind": "scripted", **WORDS}},
    )
    pcm = bytes(16000 * 2 * 2)  # 2 s of 16 kHz s16le
    with trio.fail_after(60):
        async with run_gateway(config) as gw, run_nginx(tmp_path, gw.url) as nginx:
            url = nginx.url.replace("https://", "wss://", 1) + "/v1/transcriptions/live"
            async with open_websocket_url(url, ssl_context=nginx.tls) as ws:
                # Quiet for longer than proxy_read_timeout (1 s here) before the audio: the
                # silence is the scenario, not a wait for something.
                await trio.sleep(1.5)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_audio, ws, pcm)
                    frames, code = await receive_all(ws)
            assert code == 1000 and frames[-1]["type"] == "done", frames
            async with nginx.client() as client:
                stored = await client.get(f"/v1/transcriptions/{frames[-1]['id']}")
    assert stored.status_code == 200 and stored.json()["text"] == frames[-1]["text"]


@pytest.mark.nginx
async def test_forwarded_headers_from_one_trusted_hop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    spy = ScopeSpy()
    with trio.fail_after(30):
        async with behind_nginx(tmp_path, wrap=spy.wrap, trusted_hops=1) as p:
            c = p.client
            forged = {
                "x-forwarded-for": "203.0.113.7",
                "x-forwarded-proto": "gopher",
                "x-forwarded-host": "evil.example",
            }
            first = await c.get("/healthz", headers={**forged, "x-request-id": "req-42"})
            second = await c.get("/healthz")
            await wait_until(lambda: len(access_log(caplog)) == 2)
            nginx_log = tmp_path / "nginx" / "access.log"
            await wait_until(lambda: nginx_log.read_text().count("rid=") == 2)
    assert first.status_code == second.status_code == 200
    one, two = spy.seen
    # nginx appended the address it saw; one trusted hop takes exactly that entry.
    assert one["headers"]["x-forwarded-for"] == f"203.0.113.7, {CLIENT_ADDRESS}"
    assert one["client"] == two["client"] == CLIENT_ADDRESS
    # X-Forwarded-Proto is nginx's own ($scheme), whatever the client sent.
    assert one["scheme"] == two["scheme"] == "https"
    assert one["headers"]["host"] == "127.0.0.1"
    # A client's request id passes through (and comes back); without one, nginx makes one up.
    assert one["headers"]["x-request-id"] == first.headers["x-request-id"] == "req-42"
    generated = two["headers"]["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert second.headers["x-request-id"] == generated
    # The access log names the real client under the id both sides know.
    assert access_log(caplog) == {"req-42": CLIENT_ADDRESS, generated: CLIENT_ADDRESS}
    # ...and nginx's access log under the same ids.
    assert re.findall(r"rid=(\S+)", nginx_log.read_text()) == ["req-42", generated]


@pytest.mark.nginx
async def test_without_trusted_hops_the_client_is_nginx(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    spy = ScopeSpy()
    with trio.fail_after(30):
        async with behind_nginx(tmp_path, wrap=spy.wrap) as p:
            c = p.client
            r = await c.get("/healthz", headers={"x-request-id": "req-7"})
            await wait_until(lambda: bool(access_log(caplog)))
    assert r.status_code == 200
    [seen] = spy.seen
    assert seen["headers"]["x-forwarded-for"] == CLIENT_ADDRESS
    assert seen["client"] == "127.0.0.1" and seen["scheme"] == "http"
    assert access_log(caplog) == {"req-7": "127.0.0.1"}


async def test_direct_clients_cannot_forge_without_trusted_hops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No proxy: with trusted_hops = 0 a forged X-Forwarded-For is ignored. With trusted_hops = 1
    # it would be believed, which is why trusted_hops > 0 needs a gateway only the proxy reaches.
    caplog.set_level(logging.INFO, logger="gateway.access")
    forged = {"x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https"}
    seen: dict[int, dict[str, Any]] = {}
    with trio.fail_after(30):
        for hops in (0, 1):
            spy = ScopeSpy()
            config = gateway_config(tmp_path / str(hops), trusted_hops=hops)
            transport = httpx.AsyncHTTPTransport(local_address=CLIENT_ADDRESS)
            async with (
                run_gateway(config, wrap=spy.wrap) as gw,
                httpx.AsyncClient(base_url=gw.url, transport=transport) as c,
            ):
                headers = {**forged, "x-request-id": f"hops-{hops}"}
                assert (await c.get("/healthz", headers=headers)).status_code == 200
                await wait_until(lambda: f"hops-{hops}" in access_log(caplog))  # noqa: B023
            [seen[hops]] = spy.seen
    assert seen[0]["client"] == CLIENT_ADDRESS and seen[0]["scheme"] == "http"
    assert seen[1]["client"] == "203.0.113.7" and seen[1]["scheme"] == "https"
    assert access_log(caplog) == {"hops-0": CLIENT_ADDRESS, "hops-1": "203.0.113.7"}


@pytest.mark.nginx
async def test_oversize_body_is_refused_by_nginx_and_http_redirects(tmp_path: Path) -> None:
    spy = ScopeSpy()
    with trio.fail_after(30):
        async with (
            run_gateway(gateway_config(tmp_path), wrap=spy.wrap) as gw,
            run_nginx(tmp_path, gw.url) as nginx,
        ):
            # Declared over client_max_body_size (201m): refused before a byte is read.
            tcp = await trio.open_tcp_stream("127.0.0.1", int(nginx.url.rsplit(":", 1)[1]))
            tls = trio.SSLStream(tcp, nginx.tls, server_hostname="127.0.0.1")
            head = (
                f"POST {STREAM} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
                f"Content-Length: {202 * 1024 * 1024}\r\n\r\n"
            )
            await tls.send_all(head.encode())
            response = b""
            while b"\r\n\r\n" not in response:
                response += await tls.receive_some()
            await tls.aclose()
            async with httpx.AsyncClient(base_url=nginx.plain_url) as plain:
                redirect = await plain.get("/healthz")
    assert response.startswith(b"HTTP/1.1 413 ")
    assert spy.seen == []
    assert redirect.status_code == 301
    assert redirect.headers["location"] == "https://127.0.0.1/healthz"


def test_shipped_limits_match_the_gateway_defaults() -> None:
    from gateway.audio import MULTIPART_OVERHEAD
    from gateway.config import ServerConfig

    text = SHIPPED.read_text()
    server = ServerConfig()
    [size] = re.findall(r"client_max_body_size (\d+)m;", text)
    # nginx lets through every upload the gateway accepts, framing included.
    assert server.max_upload_bytes + MULTIPART_OVERHEAD <= int(size) * 1024 * 1024
    # Streams stay alive through nginx only while keepalive < proxy_read_timeout.
    timeouts = [int(t) for t in re.findall(r"proxy_read_timeout (\d+)s;", text)]
    assert timeouts and min(timeouts) > 2 * server.keepalive
    # nginx drops idle upstream connections before hypercorn does (header_timeout).
    [block] = re.findall(r"^    upstream gateway \{\n(.*?)^    \}", text, re.M | re.S)
    [upstream_idle] = re.findall(r"^\s*keepalive_timeout (\d+)s;", block, re.M)
    assert int(upstream_idle) < server.header_timeout
