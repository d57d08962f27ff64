"""The web page: ``GET /`` and its assets, plain files shipped as package data.

The page (gateway/static/: index.html, app.js, app.css, icon.svg) talks to the gateway only through its
public API, the way any client does: ``GET /v1/models`` for the engine picker,
``POST /v1/transcriptions/stream`` read as SSE with ``fetch`` (an ``EventSource`` cannot POST),
``GET /v1/transcriptions/{id}`` for exports and permalinks, ``PUT .../corrections`` for the
editor, and the live WebSocket ``/v1/transcriptions/live`` for the microphone (WebM/Opus from
MediaRecorder, ``format=auto``; a key as the ``bearer.<key>`` subprotocol). There is no build
step and nothing is fetched from elsewhere: users may be offline.

The page and its assets are public even with auth on (they hold no data; the page asks for a key
and sends it as a Bearer header on API calls). Every answer carries a strict Content-Security-Policy
(scripts, styles and connections from this origin only, no inline code), ``nosniff`` and
``no-referrer``.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["ASSETS", "PUBLIC_PATHS", "SECURITY_HEADERS", "routes"]

#: The assets under /web/, by file name, with their media types.
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
#: What the auth middleware serves without a key.
PUBLIC_PATHS = frozenset({"/", *(f"/web/{name}" for name in ASSETS)})

# 'self' in connect-src also allows the page's own ws:// and wss:// origin (CSP level 3).
_CSP = "; ".join(
    (
        "default-src 'self'",
        "base-uri 'none'",
        "object-src 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files change with the gateway: revalidate rather than serve a stale page.
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files(__package__ or "gateway").joinpath("static", name).read_bytes()


def _file_route(path: str, name: str, media_type: str) -> Route:
    body = _read(name)

    async def serve(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    return Route(path, serve, methods=["GET"], name=f"web:{name}")


def routes() -> list[Route]:
    """``/`` (the page; ``?id=`` reopens a stored transcript) and ``/web/<asset>``."""
    return [
        _file_route("/", "index.html", "text/html; charset=utf-8"),
        *(_file_route(f"/web/{name}", name, media) for name, media in ASSETS.items()),
    ]
