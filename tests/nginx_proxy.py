"""The shipped config/nginx.conf, run for real on loopback in front of one or more gateways.

The running nginx.conf is the shipped file with only what a test must change swapped in (loopback
ports, the upstream servers' ports, a trustme certificate, temp paths, a foreground single
process, and a 1 s proxy_read_timeout); every substitution must match, so the tests follow the
shipped file. With several upstreams, the shipped file's commented second server line becomes
the replicas after the first, as an operator uncomments it.

Clients connect from 127.0.0.2 (still loopback) so that "the client's address" and "nginx's
address" (127.0.0.1) differ.

Used by tests/test_nginx.py (one gateway) and tests/replicas.py (several ``gateway serve``).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

__all__ = [
    "CLIENT_ADDRESS",
    "SHIPPED",
    "Nginx",
    "free_port",
    "nginx_binary",
    "render_conf",
    "run_nginx",
]

ROOT = Path(__file__).parent.parent
SHIPPED = ROOT / "config" / "nginx.conf"
CLIENT_ADDRESS = "127.0.0.2"


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no nginx binary: .ci/run installs Debian's nginx as root")
        pytest.skip("no nginx binary (apt-get install nginx-light, or run .ci/run as root)")
    return found


def free_port() -> int:
    # Bound and released at once: nginx (or a gateway to be restarted on the same port) needs a
    # number in advance. A clash shows up as a failed start, with its error in the test output.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Nginx:
    url: str  # https://127.0.0.1:port (TLS, h2 and http/1.1)
    plain_url: str  # http://127.0.0.1:port (redirects to https)
    tls: ssl.SSLContext  # trusts the test CA
    conf: str
    folder: Path  # access.log, error.log, stderr.log

    def client(self, *, http2: bool = True, **kw: Any) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(
            local_address=CLIENT_ADDRESS, http2=http2, verify=self.tls
        )
        return httpx.AsyncClient(
            **{"base_url": self.url, "transport": transport, "timeout": 30.0, **kw}
        )


def render_conf(
    tmp: Path,
    *,
    upstreams: Sequence[int],
    https: int,
    http: int,
    cert: Path,
    key: Path,
    extra: str = "",
) -> str:
    """The shipped nginx.conf with the test's ports, paths and timeouts, and ``upstreams`` (ports
    on 127.0.0.1) as the gateway servers."""
    first, *more = upstreams
    text = SHIPPED.read_text()
    temp = {kind: tmp / kind for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    temp_paths = "".join(f"    {kind}_temp_path {path};\n" for kind, path in temp.items())
    # One gateway leaves the second server line commented out, as shipped.
    others = "".join(f"\\1server 127.0.0.1:{port};\n" for port in more) or "\\g<0>"
    subs: list[tuple[str, str, int]] = [
        (r"^user .*;\n", "", 1),
        (r"^worker_processes .*;\n", "daemon off;\nmaster_process off;\n", 1),
        (r"^pid .*;", f"pid {tmp}/nginx.pid;", 1),
        (r"^error_log .*;", f"error_log {tmp}/error.log info;", 1),
        (r"^    access_log \S+", f"    access_log {tmp}/access.log", 1),
        (r"^http \{\n", "http {\n" + temp_paths + extra, 1),
        (r"^( *)server 127\.0\.0\.1:8000;", f"\\1server 127.0.0.1:{first};", 1),
        (r"^( *)# server 127\.0\.0\.1:8001;\n", others, 1),
        (r"^ *listen \[::\]:.*\n", "", 2),
        (r"listen 80;", f"listen 127.0.0.1:{http};", 1),
        (r"listen 443 ssl http2;", f"listen 127.0.0.1:{https} ssl http2;", 1),
        (r"ssl_certificate .*;", f"ssl_certificate {cert};", 1),
        (r"ssl_certificate_key .*;", f"ssl_certificate_key {key};", 1),
        # Low idle timeouts, so that the keepalive test crosses them quickly.
        (r"proxy_read_timeout 60s;", "proxy_read_timeout 1s;", 2),
    ]
    for pattern, replacement, count in subs:
        text, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert n == count, f"config/nginx.conf no longer has {pattern!r} x{count} (found {n})"
    for path in temp.values():
        path.mkdir()
    return text


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@asynccontextmanager
async def run_nginx(tmp_path: Path, *upstreams: str, extra: str = "") -> AsyncIterator[Nginx]:
    """The shipped nginx in front of ``upstreams`` (``http://127.0.0.1:port`` URLs), in
    ``tmp_path/nginx``; stopped (SIGTERM: fast shutdown) when the block exits."""
    binary = nginx_binary()
    tmp = tmp_path / "nginx"
    tmp.mkdir()
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    tls = ssl.create_default_context()
    ca.configure_trust(tls)
    https, http = free_port(), free_port()
    conf = render_conf(
        tmp,
        upstreams=[_port(url) for url in upstreams],
        https=https,
        http=http,
        cert=cert,
        key=key,
        extra=extra,
    )
    conf_path = tmp / "nginx.conf"
    conf_path.write_text(conf)
    cmd = [binary, "-p", str(tmp), "-c", str(conf_path), "-e", "stderr"]
    with (tmp / "stderr.log").open("wb") as stderr:
        async with trio.open_nursery() as nursery:
            run = functools.partial(trio.run_process, cmd, check=False, stderr=stderr)
            process: trio.Process = await nursery.start(run)
            try:
                await _wait_listening(https, process, tmp)
                yield Nginx(
                    f"https://127.0.0.1:{https}", f"http://127.0.0.1:{http}", tls, conf, tmp
                )
            finally:
                # trio.run_process terminates nginx (SIGTERM: fast shutdown) on cancellation.
                nursery.cancel_scope.cancel()


async def _wait_listening(port: int, process: trio.Process, tmp: Path) -> None:
    with trio.fail_after(10):
        while True:
            if process.returncode is not None:
                log = (tmp / "stderr.log").read_text() + (tmp / "error.log").read_text()
                pytest.fail(f"nginx exited with {process.returncode}:\n{log}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.01)
                continue
            await stream.aclose()
            return
