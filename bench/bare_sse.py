"""The stack's own limit for bench/overhead.py: a bare ASGI app on hypercorn with trio.

It replays SSE frames captured from the gateway: for a request whose query string is a key of the
frames file, it reads the whole request body (the gateway reads the upload too), answers 200 with
the captured response headers and sends each frame as one ``http.response.body`` message, as the
gateway does per event. No framework, no per-request tasks, no encoding.

For bench/idle.py, the query string ``hold`` (after the body) answers 200 and then only sends a
keepalive comment every ``--keepalive`` seconds until the client leaves: the least an idle SSE
stream costs on this stack (one extra task per stream watches for the disconnect).

``python bench/bare_sse.py [--frames FILE] [--keepalive S] --bind 127.0.0.1:0`` prints ``bare: serving on URL`` on
stderr, like ``gateway serve``, and stops on SIGTERM/SIGINT. FILE is JSON:
``{"headers": [[name, value], ...], "scripts": {query: [frame, ...]}}`` (latin-1 strings).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

KEEPALIVE = b": keepalive\r\n\r\n"
HOLD_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]


class BareSSE:
    def __init__(
        self,
        headers: list[tuple[bytes, bytes]],
        scripts: dict[bytes, list[bytes]],
        keepalive: float = 5.0,
    ):
        self.headers = headers
        self.scripts = scripts
        self.keepalive = keepalive

    async def _hold(self, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HOLD_HEADERS})
        async with trio.open_nursery() as nursery:

            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_disconnect)
            while True:
                await trio.sleep(self.keepalive)
                await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        script = self.scripts.get(scope["query_string"])
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
        if scope["query_string"] == b"hold":
            await self._hold(receive, send)
            return
        if script is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        for frame in script:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", help="the frames to replay (JSON)")
    parser.add_argument("--keepalive", type=float, default=5.0, help="for ?hold streams")
    parser.add_argument("--bind", default="127.0.0.1:0")
    args = parser.parse_args()
    data: dict[str, Any] = {"headers": [], "scripts": {}}
    if args.frames:
        with open(args.frames, encoding="utf-8") as f:
            data = json.load(f)
    app = BareSSE(
        [(k.encode("latin-1"), v.encode("latin-1")) for k, v in data["headers"]],
        {
            q.encode("latin-1"): [frame.encode("latin-1") for frame in frames]
            for q, frames in data["scripts"].items()
        },
        args.keepalive,
    )
    config = Config()
    config.bind = [args.bind]
    config.accesslog = None

    async def run() -> None:
        async def until_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    return

        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                lambda task_status: serve(
                    app,  # type: ignore[arg-type]
                    config,
                    shutdown_trigger=until_signal,
                    task_status=task_status,
                )
            )
            print(f"bare: serving on {', '.join(urls)}", file=sys.stderr, flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
