"""The ``gateway`` command: ``serve`` runs the server, ``transcribe`` is a live SSE client."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from .config import load_config
from .errors import ConfigError

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def main() -> None:
        async def until_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    return

        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                lambda task_status: serve(
                    config, bind=args.bind, shutdown_trigger=until_signal, task_status=task_status
                )
            )
            print(f"gateway: serving on {', '.join(urls)}", file=sys.stderr, flush=True)

    try:
        trio.run(main)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def _bar(current: float, total: float | None, width: int) -> str:
    if not total:
        return f"[{current:7.1f}s]"
    frac = max(0.0, min(1.0, current / total))
    filled = int(frac * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {current:6.1f}/{total:.1f}s"


def _transcribe(args: argparse.Namespace) -> int:
    import httpx

    path = Path(args.file)
    if not path.is_file():
        print(f"gateway: no such file: {path}", file=sys.stderr)
        return 2
    url = args.url.rstrip("/") + "/v1/transcriptions/stream"
    params: dict[str, str] = {}
    if args.engine:
        params["engine"] = args.engine
    if args.language:
        params["language"] = args.language
    if args.no_cache:
        params["use_cache"] = "false"
    tty = sys.stderr.isatty()
    columns = shutil.get_terminal_size((100, 20)).columns
    final: dict[str, Any] | None = None
    event = ""
    try:
        with (
            path.open("rb") as f,
            httpx.Client(timeout=httpx.Timeout(30.0, read=None)) as client,
            client.stream("POST", url, params=params, files={"file": (path.name, f)}) as response,
        ):
            if response.status_code != 200:
                body = response.read().decode("utf-8", "replace")
                print(f"gateway: HTTP {response.status_code}: {body}", file=sys.stderr)
                return 1
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                    if event == "queued":
                        print(f"\rqueued at position {data['position']}", end="", file=sys.stderr)
                    elif event == "transcription":
                        bar = _bar(data["current_time"], data["total_time"], 30)
                        room = max(10, columns - len(bar) - 2)
                        text = data["text"][-room:]
                        if tty:
                            print(f"\r\x1b[2K{bar} {text}", end="", file=sys.stderr, flush=True)
                        else:
                            print(f"{bar} {text}", file=sys.stderr, flush=True)
                    elif event == "done":
                        final = data
                    elif event == "error":
                        print(f"\ngateway: error {data['code']}: {data['detail']}", file=sys.stderr)
                        return 1
    except httpx.HTTPError as exc:
        print(f"gateway: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if final is None:
        print("\ngateway: the stream ended without a result", file=sys.stderr)
        return 1
    cached = " (cached)" if final.get("cached") else ""
    print("\r\x1b[2K" if tty else "", end="", file=sys.stderr)
    print(f"id {final['id']}{cached}", file=sys.stderr)
    print(final["text"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="Streaming speech-to-text gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the gateway with hypercorn on trio")
    p.add_argument("--config", help="path to gateway.toml")
    p.add_argument("--bind", help="HOST:PORT (overrides server.bind)")
    p.set_defaults(func=_serve)
    p = sub.add_parser("transcribe", help="stream a file's transcript live from a gateway")
    p.add_argument("file")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--engine", default="")
    p.add_argument("--language", default="")
    p.add_argument("--no-cache", action="store_true", help="transcribe again even if stored")
    p.set_defaults(func=_transcribe)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
