"""The ``gateway`` command: ``serve`` runs the server, ``transcribe`` is a live SSE client,
``keys`` manages API keys, ``store migrate`` applies the store's schema migrations."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from .config import load_config
from .errors import ConfigError
from .logs import configure_logging

__all__ = ["main"]


# glibc gives each thread that allocates its own malloc arena, up to 8 per core. The decoder and
# store threads then spread short-lived buffers over many arenas whose freed pages are rarely
# returned: RSS crept up 6 % in an 8-minute soak with a flat Python heap, 1.9 % with 2 arenas.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas at MALLOC_ARENAS, unless MALLOC_ARENA_MAX is set (glibc reads
    it itself). True when the cap was applied; False elsewhere (musl, macOS) or when the
    environment decides."""
    if os.environ.get("MALLOC_ARENA_MAX") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS))
    except (OSError, AttributeError):
        return False


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    limit_malloc_arenas()

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log)

    async def main() -> None:
        # The first SIGTERM/SIGINT starts the drain; a second one cuts its grace short.
        first, second = trio.Event(), trio.Event()

        async def count_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    (second if first.is_set() else first).set()

        async with trio.open_nursery() as nursery:

            async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve(
                    config,
                    bind=args.bind,
                    shutdown_trigger=first.wait,
                    hurry_trigger=second.wait,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()

            nursery.start_soon(count_signals)
            urls = await nursery.start(run_server)
            print(f"gateway: serving on {', '.join(urls)}", file=sys.stderr, flush=True)

    try:
        trio.run(main)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def _keys_file(args: argparse.Namespace) -> str:
    if args.keys_file:
        return str(args.keys_file)
    path = load_config(args.config).auth.keys_file
    if not path:
        raise ConfigError("auth.keys_file is not set: set it or pass --keys-file")
    return path


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _keys(args: argparse.Namespace) -> int:
    from . import auth

    try:
        path = _keys_file(args)
        if args.action == "add":
            record, key = auth.add_key(path, args.tenant)
            print(f"gateway: key {record.id} for tenant {record.tenant!r}", file=sys.stderr)
            print("gateway: the key is shown only this once; store it now", file=sys.stderr)
            print(key)
        elif args.action == "list":
            print("id\ttenant\tcreated\trevoked")
            for r in auth.list_keys(path):
                revoked = _when(r.revoked) if r.revoked is not None else "-"
                print(f"{r.id}\t{r.tenant}\t{_when(r.created)}\t{revoked}")
        else:
            record = auth.revoke_key(path, args.id)
            print(
                f"gateway: key {record.id} of tenant {record.tenant!r} is revoked", file=sys.stderr
            )
    except (ConfigError, ValueError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except KeyError:
        print(f"gateway: no key with id {args.id!r}", file=sys.stderr)
        return 1
    return 0


def _store(args: argparse.Namespace) -> int:
    from .errors import StoreError
    from .store import migrate_store

    try:
        before, after = migrate_store(load_config(args.config).store)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    print(f"schema {before} -> {after}")
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
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    tty = sys.stderr.isatty()
    columns = shutil.get_terminal_size((100, 20)).columns
    final: dict[str, Any] | None = None
    event = ""
    try:
        with (
            path.open("rb") as f,
            httpx.Client(timeout=httpx.Timeout(30.0, read=None), headers=headers) as client,
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
    keys = sub.add_parser("keys", help="manage API keys (auth.keys_file)")
    actions = keys.add_subparsers(dest="action", required=True)
    for name, text in [
        ("add", "create a key for a tenant and print it (once)"),
        ("list", "list key ids, tenants, creation and revocation times (never secrets)"),
        ("revoke", "revoke a key by id; the gateway refuses it from the next request"),
    ]:
        p = actions.add_parser(name, help=text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--config", help="path to gateway.toml (its auth.keys_file)")
        where.add_argument("--keys-file", help="path to the keys file")
        if name == "add":
            p.add_argument("--tenant", required=True)
        elif name == "revoke":
            p.add_argument("id")
        p.set_defaults(func=_keys)
    store = sub.add_parser("store", help="the transcript store (store.path, or store.url)")
    store_actions = store.add_subparsers(dest="action", required=True)
    p = store_actions.add_parser(
        "migrate", help="apply pending schema migrations and print the versions (serve does too)"
    )
    p.add_argument("--config", help="path to gateway.toml")
    p.set_defaults(func=_store)
    p = sub.add_parser("transcribe", help="stream a file's transcript live from a gateway")
    p.add_argument("file")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--engine", default="")
    p.add_argument("--language", default="")
    p.add_argument("--no-cache", action="store_true", help="transcribe again even if stored")
    # Not GATEWAY_*: that prefix is reserved for configuration overrides.
    p.add_argument(
        "--api-key",
        default=os.environ.get("ASR_GATEWAY_API_KEY", ""),
        help="API key (default: $ASR_GATEWAY_API_KEY)",
    )
    p.set_defaults(func=_transcribe)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
