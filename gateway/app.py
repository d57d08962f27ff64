"""The Starlette application: front API routes, health, readiness and metrics, and the lifespan
that opens the store and the engines and closes them again.

The app is the top of the import graph: it assembles the fronts (``gateway.api``), the auth
middleware and the job state (:mod:`gateway.jobs`); nothing below imports it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import metrics, openapi, web
from .admission import UNLIMITED
from .api import aymurai, live, native, openai_compat, realtime
from .api.common import ErrorResponder
from .auth import AuthMiddleware, KeyRing
from .cluster import open_cluster
from .config import Config
from .engines import build_engine
from .errors import BadRequest, ClientDisconnected, GatewayError, MethodNotAllowed, NotFound
from .jobs import GatewayState
from .logs import RequestLogMiddleware, current_request
from .store import open_store

__all__ = ["create_app", "error_response_for"]

log = logging.getLogger("gateway")
_json = msgspec.json.Encoder()


# The paths each front API owns besides the native one, which answers all others (health too).
_FRONT_ERRORS: tuple[tuple[tuple[str, ...], ErrorResponder], ...] = (
    (("/v1/audio/", "/v1/models", realtime.PATH), openai_compat.error_response),
    (("/asr/",), aymurai.error_response),
)


def error_response_for(path: str, exc: GatewayError) -> Response:
    """``exc`` in the error shape of the front API that owns ``path`` (native by default)."""
    for prefixes, error_response in _FRONT_ERRORS:
        if path.startswith(prefixes):
            return error_response(exc)
    return native.error_response(exc)


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(request: Request) -> Response:
    """Ready or not, with each part's own verdict beside the overall one: ``store`` is "ok" or
    why it is not writable, ``admission`` says where sessions are admitted (``local``: this
    process's engines alone; ``cluster``: shared by the replicas on one PostgreSQL) and whether
    this replica admits. Any reason makes it a 503."""
    state: GatewayState | None = getattr(request.app.state, "gateway", None)
    reasons: list[str] = []
    engines: dict[str, object] = {}
    store = admission = "starting"
    mode = "local"
    replica: str = getattr(request.app.state, "replica", "")
    if state is None:
        reasons.append("starting")
    else:
        if state.draining:
            reasons.append("shutting down")
        # The store and admission are reported while draining too: they still serve the streams
        # in flight, and an operator reading a 503 wants to know whether only the drain is why.
        store = await state.store.check_writable() or "ok"
        admission = "ok"
        if state.cluster is not None:
            mode, replica = "cluster", state.cluster.replica
            admission = state.cluster.problem() or "ok"
        reasons.extend(verdict for verdict in (store, admission) if verdict != "ok")
        if not state.draining:
            for name, engine in state.engines.items():
                engines[name] = engine.stats()
            default = state.engines[state.config.server.default_engine]
            if (reason := await default.readiness()) is not None:
                reasons.append(f"engine {default.name}: {reason}")
    body = {
        "status": "ready" if not reasons else "unready",
        "reasons": reasons,
        "store": store,
        "admission": {"mode": mode, "replica": replica, "status": admission},
        "engines": engines,
    }
    return Response(
        _json.encode(body), status_code=503 if reasons else 200, media_type="application/json"
    )


async def metrics_endpoint(request: Request) -> Response:
    replica: str = request.app.state.replica
    return Response(metrics.render(replica), media_type=CONTENT_TYPE_LATEST)


async def routing_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path, a method the path does not take) as coded errors
    in the shape of the front API the path belongs to, instead of plain text."""
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 404:
        error = NotFound("no route matches this path")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"this path does not take {request.method}")
    else:
        error = BadRequest(exc.detail)
        error.status = exc.status_code
    response = error_response_for(request.url.path, error)
    response.headers.update(exc.headers or {})
    return response


class _NoAnswer(Response):
    """Sends nothing: for a client that is gone."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return


async def client_disconnected(request: Request, exc: Exception) -> Response:
    """A client that left mid-body gets no answer (nobody is there): the access log says
    499 DISCONNECTED, and nothing is logged as an error."""
    if (entry := current_request()) is not None:
        entry.outcome = ClientDisconnected.code
    return _NoAnswer()


def create_app(config: Config) -> Starlette:
    """Build the ASGI app; the store and engines open in its lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            # This replica's name in /metrics and /readyz, fixed for the process's life.
            app.state.replica = config.cluster.replica_name()
            store = await stack.enter_async_context(open_store(config.store))
            state = GatewayState(config, store)
            for name, engine_config in config.engines.items():
                engine = build_engine(name, engine_config)
                stack.push_async_callback(engine.aclose)
                state.engines[name] = engine
            if config.store.url:
                # Several replicas on one PostgreSQL share every engine's caps and queue.
                cluster = await stack.enter_async_context(
                    open_cluster(config.store.url, config.cluster)
                )
                for name, engine in state.engines.items():
                    # An embedded engine's cap is this replica's cores; an uncapped one queues
                    # nothing: both keep their own admission.
                    if engine.shares_upstream and engine.admission.capacity < UNLIMITED:
                        engine.admission = cluster.admission(name, engine.admission)
                state.cluster = cluster
            async with anyio.create_task_group() as tg:
                for engine in state.engines.values():
                    tg.start_soon(engine.start)
            collector = metrics.EngineStatsCollector(lambda: state.engines.values())
            metrics.REGISTRY.register(collector)
            stack.callback(metrics.REGISTRY.unregister, collector)
            app.state.gateway = state
            log.info(
                "gateway ready: engines %s, store %s", ", ".join(state.engines), store.location
            )
            yield
            log.info("gateway stopping")

    routes = [
        *native.routes(),
        *live.routes(),
        *realtime.routes(),
        *aymurai.routes(),
        *openai_compat.routes(),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *openapi.routes(config),
        *web.routes(),
    ]
    # The access log is outermost, so that refused requests are logged with their X-Request-ID too.
    middleware = [Middleware(RequestLogMiddleware)]
    if config.auth.keys_file:
        keys = KeyRing(config.auth.keys_file)
        middleware.append(
            Middleware(
                AuthMiddleware,
                keys=keys,
                error_response=error_response_for,
                protect_metrics=config.auth.protect_metrics,
                public_paths=web.PUBLIC_PATHS,
            )
        )
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={
            HTTPException: routing_error,
            ClientDisconnected: client_disconnected,
        },
    )
