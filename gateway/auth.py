"""API keys, one tenant per key: the keys file, its management and the auth middleware.

A key reads ``gw_<id>_<secret>``: ``<id>`` is 16 hex digits, ``<secret>`` 43 url-safe characters
(``secrets.token_urlsafe(32)``, 256 bits). The id selects the one record to check, so a request
costs at most one hash. The keys file holds one JSON object per line::

    {"id": "...", "tenant": "acme", "salt": "<hex>", "hash": "<hex>", "n": 16384, "r": 8, "p": 1,
     "created": 1700000000.0, "revoked": null}

``hash`` is ``scrypt(secret, salt, n, r, p, dklen=32)`` (n=2^14, r=8, p=1: 16 MiB and about 50 ms
on one core), compared with :func:`hmac.compare_digest`. Secrets are never stored. Writes replace
the file atomically (temporary file + ``os.replace``, mode 0600) under an advisory lock; the
gateway stats the file on every request and reloads it when it changed, so a revocation takes
effect on the next request without a restart.

The middleware answers a refused request in the error shape of the front API it was meant for,
through the responder the app gives it: this module must never import a front API, the app,
the jobs or the pipeline (``gateway keys`` loads none of them).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import msgspec
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ConfigError, GatewayError, Unauthorized
from .logs import current_request

__all__ = [
    "BEARER_SUBPROTOCOL",
    "KEY_PREFIX",
    "AuthMiddleware",
    "ErrorResponderFor",
    "KeyRecord",
    "KeyRing",
    "add_key",
    "list_keys",
    "revoke_key",
]

log = logging.getLogger("gateway.auth")

KEY_PREFIX = "gw_"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
# Verified keys are remembered so that a client does not pay one scrypt per request: at most
# CACHE_SIZE keys, each for CACHE_SECONDS, and the whole cache is dropped when the file changes.
CACHE_SIZE = 1024
CACHE_SECONDS = 60.0
# Two concurrent hashes at most (16 MiB each): a flood of wrong secrets costs bounded CPU and memory.
_HASH_LIMITER_TOKENS = 2
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

_KEY_RE = re.compile(r"gw_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant: str
    salt: str
    hash: str
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P
    created: float
    revoked: float | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(KeyRecord)


def _scrypt(secret: str, record: KeyRecord) -> bytes:
    return hashlib.scrypt(
        secret.encode(),
        salt=bytes.fromhex(record.salt),
        n=record.n,
        r=record.r,
        p=record.p,
        maxmem=SCRYPT_MAXMEM,
        dklen=32,
    )


def _read(path: Path) -> list[KeyRecord]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(_decoder.decode(line))
            except msgspec.DecodeError as exc:
                raise ConfigError(f"{path}:{number}: invalid key record: {exc}") from exc
    return records


def _write(path: Path, records: list[KeyRecord]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for record in records:
                f.write(_encoder.encode(record) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[list[KeyRecord]]:
    """Read the records under an exclusive lock (a sibling ``.lock`` file), for read-modify-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield _read(path)


def add_key(path: str | os.PathLike[str], tenant: str) -> tuple[KeyRecord, str]:
    """Create a key for ``tenant``; returns its record and the key itself (shown only once)."""
    if not _TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant must match {_TENANT_RE.pattern}, got {tenant!r}")
    p = Path(path)
    with _locked(p) as records:
        ids = {r.id for r in records}
        while (key_id := secrets.token_hex(8)) in ids:
            pass
        secret = secrets.token_urlsafe(32)
        record = KeyRecord(
            id=key_id, tenant=tenant, salt=secrets.token_hex(16), hash="", created=time.time()
        )
        record = msgspec.structs.replace(record, hash=_scrypt(secret, record).hex())
        _write(p, [*records, record])
    return record, f"{KEY_PREFIX}{key_id}_{secret}"


def list_keys(path: str | os.PathLike[str]) -> list[KeyRecord]:
    return _read(Path(path))


def revoke_key(path: str | os.PathLike[str], key_id: str) -> KeyRecord:
    """Mark a key revoked (idempotent: a revoked key keeps its first revocation time)."""
    p = Path(path)
    with _locked(p) as records:
        for i, record in enumerate(records):
            if record.id == key_id:
                if record.revoked is None:
                    records[i] = msgspec.structs.replace(record, revoked=time.time())
                    _write(p, records)
                return records[i]
    raise KeyError(key_id)


class KeyRing:
    """The keys file as the gateway sees it: reloaded whenever its inode, size or mtime change."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._loaded = False
        self._signature: tuple[int, int, int] | None = None
        self._records: dict[str, KeyRecord] = {}
        self._cache: OrderedDict[bytes, tuple[KeyRecord, float]] = OrderedDict()
        # A per-process key for the cache's fast digests: the cache never holds a usable secret.
        self._pepper = secrets.token_bytes(32)
        self._limiter = anyio.CapacityLimiter(_HASH_LIMITER_TOKENS)
        self.refresh(strict=True)

    def refresh(self, *, strict: bool = False) -> None:
        """Reload the file if it changed. A broken file is an error at start-up (``strict``); later
        it is logged and every key is refused until it is fixed (fail closed)."""
        try:
            st = os.stat(self.path)
            signature: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        if self._loaded and signature == self._signature:
            return
        self._loaded, self._signature = True, signature
        self._cache.clear()
        try:
            records = _read(self.path)
        except (ConfigError, OSError) as exc:
            if strict:
                raise ConfigError(str(exc)) from exc
            log.error("keys file unusable, refusing every key: %s", exc)
            self._records = {}
            return
        if signature is None:
            log.warning("keys file %s does not exist: every request is refused", self.path)
        self._records = {r.id: r for r in records}

    async def authenticate(self, key: str) -> str:
        """The tenant of a valid, unrevoked key; :class:`Unauthorized` otherwise."""
        self.refresh()
        match = _KEY_RE.fullmatch(key)
        record = self._records.get(match.group(1)) if match else None
        if match is None or record is None or record.revoked is not None:
            raise Unauthorized("invalid or revoked API key")
        digest = hmac.digest(self._pepper, key.encode(), "blake2b")
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] is record and cached[1] > now:
            return record.tenant
        computed = await anyio.to_thread.run_sync(
            _scrypt, match.group(2), record, limiter=self._limiter
        )
        if not hmac.compare_digest(computed, bytes.fromhex(record.hash)):
            raise Unauthorized("invalid or revoked API key")
        self._cache[digest] = (record, now + CACHE_SECONDS)
        self._cache.move_to_end(digest)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return record.tenant


#: ``exc`` as the answer to a request for ``path``, in the error shape of the API owning it.
ErrorResponderFor = Callable[[str, GatewayError], Response]


def _bearer(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


#: A WebSocket subprotocol that carries a key: browsers cannot set headers on a WebSocket, but
#: they can offer subprotocols (``new WebSocket(url, ["asr-gateway", "bearer.<key>"])``).
BEARER_SUBPROTOCOL = "bearer."


def _websocket_key(scope: Scope, headers: Headers) -> str | None:
    """A WebSocket's key: ``Authorization: Bearer`` (programmatic clients) or else a
    ``bearer.<key>`` subprotocol, which is taken out of the scope so that the app can never
    echo it back. Never a key in the URL: URLs end up in logs and browser histories."""
    offered: list[str] = scope.get("subprotocols", [])
    carried = [p for p in offered if p.startswith(BEARER_SUBPROTOCOL)]
    if carried:
        scope["subprotocols"] = [p for p in offered if not p.startswith(BEARER_SUBPROTOCOL)]
    key = _bearer(headers)
    if key is None and carried:
        key = carried[0][len(BEARER_SUBPROTOCOL) :] or None
    return key


class AuthMiddleware:
    """Requires ``Authorization: Bearer <key>`` on every route but health, readiness and (unless
    protected) metrics, and puts the key's tenant in ``scope["state"]["tenant"]``; a refusal is
    answered by ``error_response`` in the shape of the API the path belongs to. A WebSocket may
    carry its key in a subprotocol instead (see :func:`_websocket_key`), and is refused before
    the upgrade, with the same HTTP answer."""

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        *,
        error_response: ErrorResponderFor,
        protect_metrics: bool = False,
        public_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.keys = keys
        self.error_response = error_response
        # ``public_paths``: what holds no data and must load before a key is known (the web page).
        open_paths = OPEN_PATHS | public_paths
        self.open_paths = open_paths if protect_metrics else open_paths | {"/metrics"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        key = _bearer(headers) if scope["type"] == "http" else _websocket_key(scope, headers)
        try:
            if key is None:
                raise Unauthorized("an API key is required: Authorization: Bearer <key>")
            tenant = await self.keys.authenticate(key)
        except Unauthorized as exc:
            if (entry := current_request()) is not None:
                entry.outcome = exc.code
            response = self.error_response(scope["path"], exc)
            response.headers["WWW-Authenticate"] = (
                'Bearer error="invalid_token"' if key is not None else "Bearer"
            )
            # The refused body is never read, so an HTTP/1.1 connection cannot carry another
            # request: say so, or the client reuses it and fails ("server disconnected").
            has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
            if has_body and scope.get("http_version") in ("1.0", "1.1"):
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)
