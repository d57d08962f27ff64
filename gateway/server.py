"""Serving the app with hypercorn on the trio worker: HTTP/1.1, h2c and h2 over TLS (ALPN)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h2.events
import h11
import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.middleware import ProxyFixMiddleware
from hypercorn.trio import serve as hypercorn_serve
from starlette.types import ASGIApp

from .app import create_app
from .audio import sweep_spool
from .config import Config
from .errors import ConfigError, GatewayError, HeadersTooLarge, MalformedRequest

__all__ = ["asgi_app", "framing_error_body", "hypercorn_config", "serve"]

log = logging.getLogger("gateway.server")

# Keys of hypercorn.toml that we accept; hypercorn itself silently keeps misspelled ones.
_HYPERCORN_KEYS = {
    name
    for name in dir(HypercornConfig)
    if not name.startswith("_") and not callable(getattr(HypercornConfig, name, None))
} | {"bind", "insecure_bind", "quic_bind", "certfile", "keyfile", "ca_certs", "alpn_protocols"}
# Keys of hypercorn.toml that would fight our own settings, and why.
_REFUSED_KEYS = {
    "keep_alive_timeout": "it is set from server.header_timeout",
    "ssl_handshake_timeout": "it is set from server.header_timeout",
    "read_timeout": "it would cut SSE streams whose client sends nothing while it reads",
}


def framing_error_body(error: GatewayError) -> bytes:
    """The body of an answer to bytes that do not frame an HTTP request.

    Which front API the request was for is unknown (its path may never have been read), so the
    body is every API's error shape at once: native ``{"error": {"code", "detail"}}``, OpenAI
    ``{"error": {"message", "type", "param", "code"}}`` and AymurAI ``{"detail", "code"}``."""
    return msgspec.json.encode(
        {
            "error": {
                "code": error.code,
                "detail": error.detail,
                "message": error.detail,
                "type": "invalid_request_error",
                "param": None,
            },
            "code": error.code,
            "detail": error.detail,
        }
    )


# What h11 found wrong, by the status it suggests: 431 for headers past its size limit, 501 for
# a transfer coding it does not implement (a 5xx the gateway never answers: the request is
# refused, it is malformed for us), 400 for the rest.
_FRAMING_ERRORS = {
    431: HeadersTooLarge("the request headers are too large"),
    501: MalformedRequest("unsupported Transfer-Encoding; only chunked is accepted"),
}
_MALFORMED = MalformedRequest("the bytes received do not frame an HTTP/1.1 request")


def _harden_hypercorn() -> None:
    """Three changes to hypercorn's serving, made once per process.

    - A request h11 cannot parse (a bad Content-Length, Content-Length with Transfer-Encoding, a
      broken request line or header, headers too large, a body cut short) gets a coded JSON 4xx
      instead of hypercorn's empty 400, 431 or 501. Hypercorn sends those answers itself, before
      any ASGI app runs, from one method of its protocol, which is replaced. (h2 refuses such
      requests with a stream reset, which has no body to code.)
    - Closing a connection takes the connection's send lock. Hypercorn's ``_close`` shuts the
      socket's write side without it, and trio's ``send_eof`` holds the socket's send guard
      across a checkpoint: a response written at that moment (the app's answer to a request whose
      client just half-closed, or hypercorn's own error answer) failed with BusyResourceError,
      which in hypercorn's reader task ended the whole server.
    - On h2, request DATA that arrives after the answer ended is acknowledged and dropped. An app
      may answer before the body is in (a refusal, a live body's error event); the stream is
      then closed for hypercorn, which forgets it, but still open for the client, which may
      send on. Hypercorn 0.18 looked such DATA up among its streams (it ignores a late
      END_STREAM, not DATA), and the KeyError ended the whole server.
    """
    from hypercorn.protocol import h2 as hypercorn_h2
    from hypercorn.protocol import h11 as hypercorn_h11
    from hypercorn.trio import tcp_server

    protocol = hypercorn_h11.H11Protocol
    if getattr(protocol._send_error_response, "gateway_coded", False):
        return

    async def send_error_response(self: Any, status_code: int) -> None:
        error = _FRAMING_ERRORS.get(status_code, _MALFORMED)
        body = framing_error_body(error)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=error.status, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    send_error_response.gateway_coded = True  # type: ignore[attr-defined]
    protocol._send_error_response = send_error_response  # type: ignore[method-assign]

    unlocked_close = tcp_server.TCPServer._close

    async def close(self: Any) -> None:
        if self.send_lock.statistics().owner is trio.lowlevel.current_task():
            await unlocked_close(self)  # closing from inside a send
            return
        async with self.send_lock:
            await unlocked_close(self)

    tcp_server.TCPServer._close = close  # type: ignore[method-assign]

    handle_events = hypercorn_h2.H2Protocol._handle_events

    async def handle_late_data(self: Any, events: list[h2.events.Event]) -> None:
        # One event at a time: a stream opened earlier in the same batch must be known first.
        dropped = False
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                # Still counted against the connection's window: give it back.
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
                dropped = True
                continue
            await handle_events(self, [event])
        if dropped:
            await self._flush()

    hypercorn_h2.H2Protocol._handle_events = handle_late_data  # type: ignore[method-assign]


def asgi_app(config: Config, app: ASGIApp | None = None) -> ASGIApp:
    """The app as served: ``app`` (by default a new :func:`create_app`) behind hypercorn's proxy
    fix when ``server.trusted_hops`` > 0, so that the scope's client and scheme are the ones the
    trusted proxies saw (their X-Forwarded-For/-Proto, counted from the right)."""
    inner = app if app is not None else create_app(config)
    hops = config.server.trusted_hops
    if hops == 0:
        return inner
    return ProxyFixMiddleware(inner, mode="legacy", trusted_hops=hops)  # type: ignore[arg-type,return-value]


def hypercorn_config(config: Config, bind: str | None = None) -> HypercornConfig:
    """Hypercorn settings from ``server.hypercorn_config`` (validated) plus our own server keys."""
    _harden_hypercorn()
    hc = HypercornConfig()
    if config.server.hypercorn_config:
        import tomllib

        path = Path(config.server.hypercorn_config)
        try:
            data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        unknown = sorted(set(data) - _HYPERCORN_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown hypercorn setting(s): {', '.join(unknown)}")
        refused = [f"{k} ({_REFUSED_KEYS[k]})" for k in sorted(set(data) & _REFUSED_KEYS.keys())]
        if refused:
            raise ConfigError(f"{path}: setting(s) refused here: {', '.join(refused)}")
        hc = HypercornConfig.from_mapping(data)
    hc.bind = [bind or config.server.bind]
    if config.server.certfile or config.server.keyfile:
        if not (config.server.certfile and config.server.keyfile):
            raise ConfigError("server.certfile and server.keyfile must be set together")
        hc.certfile = config.server.certfile
        hc.keyfile = config.server.keyfile
    hc.alpn_protocols = ["h2", "http/1.1"]
    # Hypercorn's idle timer runs from the connection's start (after the TLS handshake) or the end
    # of its previous response until a request's headers are complete, however slowly bytes trickle
    # in: that is the slow-loris header limit, and the idle keep-alive limit at once.
    hc.keep_alive_timeout = config.server.header_timeout
    hc.ssl_handshake_timeout = config.server.header_timeout
    # Live WebSockets get a ping whenever an SSE stream would get a keepalive comment.
    hc.websocket_ping_interval = config.server.keepalive or None
    # The gateway writes its own access log; hypercorn's errors go through the root handlers (JSON
    # or text, see gateway.logs) instead of a plain stderr handler of hypercorn's own.
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


# After stop_jobs(), streams get this long to send their SHUTTING_DOWN event before the server
# closes connections.
_FLUSH_SECONDS = 5.0


async def _drain(
    app: Any,
    config: Config,
    signalled: Callable[[], Awaitable[None]],
    hurry: Callable[[], Awaitable[None]] | None,
) -> None:
    """The shutdown trigger handed to hypercorn: returns when the server may stop accepting.

    Why not hand hypercorn the signal directly: hypercorn stops listening at once, so /readyz could
    not report the drain to the load balancer and new requests would get connection errors instead
    of a clean 503. So on the signal the app drains first (readyz 503, new jobs refused), in-flight
    jobs get ``shutdown_grace`` seconds, those left are stopped with SHUTTING_DOWN (never stored),
    and only then does hypercorn close; the lifespan then closes the engines and the store.
    """
    await signalled()
    state = getattr(app.state, "gateway", None)
    if state is None:
        return
    state.drain()
    log.info(
        "draining: %d job(s) in flight, grace %.1f s",
        state.active_jobs,
        config.server.shutdown_grace,
    )
    async with trio.open_nursery() as nursery:
        if hurry is not None:

            async def hurried() -> None:
                await hurry()
                log.info("second signal: stopping in-flight jobs now")
                nursery.cancel_scope.cancel()

            nursery.start_soon(hurried)
        with trio.move_on_after(config.server.shutdown_grace):
            await state.wait_idle()
        nursery.cancel_scope.cancel()
    if state.active_jobs:
        log.info("grace over: stopping %d job(s)", state.active_jobs)
    state.stop_jobs()
    with trio.move_on_after(_FLUSH_SECONDS):
        await state.wait_idle()


async def serve(
    config: Config,
    *,
    bind: str | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    hurry_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns and the drain is over (or forever); reports the
    bound URLs when started. ``hurry_trigger`` (a second signal) cuts the grace short.

    Before anything is served, the spool files of gateways that died without cleaning up (SIGKILL,
    OOM kill, power loss) are removed; live gateways sharing the spool directory keep theirs
    (:func:`gateway.audio.sweep_spool`)."""
    spool_dir = config.server.spool_dir or None
    removed = await trio.to_thread.run_sync(sweep_spool, spool_dir)
    if removed:
        log.info("removed %d spool file(s) left by a stopped gateway", removed)
    app = create_app(config)
    trigger = None
    if shutdown_trigger is not None:
        signalled = shutdown_trigger

        async def trigger() -> None:
            await _drain(app, config, signalled, hurry_trigger)

    await hypercorn_serve(
        asgi_app(config, app),  # type: ignore[arg-type]
        hypercorn_config(config, bind),
        shutdown_trigger=trigger,
        task_status=task_status,
    )
