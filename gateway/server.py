"""Serving the app with hypercorn on the trio worker: HTTP/1.1, h2c and h2 over TLS (ALPN)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .app import create_app
from .config import Config
from .errors import ConfigError

__all__ = ["hypercorn_config", "serve"]

# Keys of hypercorn.toml that we accept; hypercorn itself silently keeps misspelled ones.
_HYPERCORN_KEYS = {
    name
    for name in dir(HypercornConfig)
    if not name.startswith("_") and not callable(getattr(HypercornConfig, name, None))
} | {"bind", "insecure_bind", "quic_bind", "certfile", "keyfile", "ca_certs", "alpn_protocols"}


def hypercorn_config(config: Config, bind: str | None = None) -> HypercornConfig:
    """Hypercorn settings from ``server.hypercorn_config`` (validated) plus our own server keys."""
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
        hc = HypercornConfig.from_mapping(data)
    hc.bind = [bind or config.server.bind]
    if config.server.certfile or config.server.keyfile:
        if not (config.server.certfile and config.server.keyfile):
            raise ConfigError("server.certfile and server.keyfile must be set together")
        hc.certfile = config.server.certfile
        hc.keyfile = config.server.keyfile
    hc.alpn_protocols = ["h2", "http/1.1"]
    hc.accesslog = None
    return hc


async def serve(
    config: Config,
    *,
    bind: str | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (or forever); reports the bound URLs when started."""
    app = create_app(config)
    await hypercorn_serve(
        app,  # type: ignore[arg-type]
        hypercorn_config(config, bind),
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )
