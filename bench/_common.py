"""Helpers shared by the benchmark scripts in bench/.

- :func:`start_gateway`: a real ``gateway serve`` subprocess on 127.0.0.1 with a generated config
  (store and logs in a temporary directory), stopped with SIGTERM on exit; :func:`start_server`
  for any other server script that prints ``serving on URL``;
- :class:`ProcStats` / :func:`cpu_seconds`, :func:`rss_bytes`, :func:`fd_count`: a process's
  CPU time, resident memory and open descriptors from /proc;
- :func:`percentile`, :func:`markdown_table`, :func:`machine`: figures and output;
- :func:`raise_fd_limit`, :func:`silent_wav`, :func:`active_streams`, :func:`wait_until`;
- a lean raw HTTP/1.1 client for SSE over trio sockets (:func:`upload_request`,
  :class:`SSEReader`): a Python load generator must cost far less per event than the server it
  measures, so it parses only what it needs (status, chunked framing, event boundaries).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

__all__ = [
    "ROOT",
    "ProcStats",
    "SSEReader",
    "ServerProcess",
    "active_streams",
    "cpu_seconds",
    "fd_count",
    "machine",
    "markdown_table",
    "percentile",
    "raise_fd_limit",
    "rss_bytes",
    "silent_wav",
    "start_gateway",
    "start_server",
    "upload_request",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# --- the gateway as a subprocess ----------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml(config: Mapping[str, Any], prefix: str = "") -> str:
    """A small TOML writer for nested tables of scalars and lists (enough for gateway.toml)."""
    scalars = {k: v for k, v in config.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in config.items() if isinstance(v, Mapping)}
    out = [f"[{prefix}]"] if prefix and scalars else []
    out += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for k, v in tables.items():
        out.append(_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(out) + "\n"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the benchmark dies (Linux prctl), so a killed
    benchmark leaves no server behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_pid(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@dataclass
class ServerProcess:
    url: str
    pid: int  # the gateway's own process (not a wrapper such as py-spy)
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")


@contextlib.contextmanager
def start_server(
    argv: Sequence[str],
    *,
    workdir: Path,
    wrap: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
    start_timeout: float = 60.0,
    stop_timeout: float = 30.0,
) -> Iterator[ServerProcess]:
    """Run ``argv`` (a Python server that prints ``...: serving on http://HOST:PORT`` once it
    listens), logging to ``workdir/server.log``; SIGTERM (then SIGKILL) on exit.

    ``wrap`` is a command prefix (e.g. ``py-spy record ... --``); the yielded ``pid`` is then the
    server's own process, found as the wrapper's child.
    """
    logfile = workdir / "server.log"
    with logfile.open("wb") as log:
        proc = subprocess.Popen(
            [*wrap, *argv],
            cwd=cwd,  # `python -m gateway.cli` imports the gateway of the checkout in cwd
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent,
        )
    pid = proc.pid
    try:
        deadline = time.monotonic() + start_timeout
        url = None
        while url is None:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited ({proc.returncode}):\n{logfile.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:4]} did not start:\n{logfile.read_text()}")
            found = re.search(r": serving on (http://[\d.:]+)", logfile.read_text())
            if found:
                url = found.group(1)
            else:
                time.sleep(0.05)
        if wrap:
            child = _child_pid(proc.pid)
            if child is None:
                raise RuntimeError("cannot find the server under its wrapper")
            pid = child
        yield ServerProcess(url, pid, proc, workdir)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def start_gateway(
    config: Mapping[str, Any],
    *,
    wrap: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    source: Path = ROOT,
) -> Iterator[ServerProcess]:
    """Run ``gateway serve`` on 127.0.0.1 (a free port) with ``config`` written as TOML.

    ``source`` is the checkout whose ``gateway`` package runs (another commit's worktree, to
    compare versions side by side); by default this one.

    ``config`` is the gateway.toml content as nested dicts; ``store.path`` defaults to a file in
    the temporary working directory. The child inherits this process's RLIMIT_NOFILE, so call
    :func:`raise_fd_limit` first for many connections. See :func:`start_server` for ``wrap``.
    """
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        workdir = Path(tmp)
        data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
        data.setdefault("store", {}).setdefault("path", str(workdir / "gateway.sqlite3"))
        (workdir / "gateway.toml").write_text(_toml(data))
        argv = [sys.executable, "-m", "gateway.cli", "serve"]
        argv += ["--config", str(workdir / "gateway.toml"), "--bind", "127.0.0.1:0"]
        with start_server(argv, workdir=workdir, wrap=wrap, env=env, cwd=source) as server:
            yield server


async def wait_until(check: Callable[[], Awaitable[bool]], interval: float = 0.05) -> None:
    """Re-check ``check`` every ``interval`` seconds until it holds. Only for state outside this
    process (/proc, a server's /metrics), which offers no event to wait on; bound the wait with
    ``trio.fail_after``."""
    while not await check():  # noqa: ASYNC110
        await trio.sleep(interval)


def active_streams(url: str) -> float:
    """The gateway's ``gateway_active_streams`` gauge, summed over engines (GET /metrics)."""
    # Connection: close, so polling does not leave keep-alive sockets in the gateway's fd count.
    text = httpx.get(url + "/metrics", headers={"Connection": "close"}, timeout=120).text
    values = re.findall(r"^gateway_active_streams\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return sum(float(v) for v in values)


# --- /proc ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size in bytes (``/proc/<pid>/statm``)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class ProcStats:
    """CPU seconds and wall time of a process between :meth:`start` and :meth:`stop`."""

    pid: int
    cpu: float = 0.0
    wall: float = 0.0
    _t0: tuple[float, float] = field(default=(0.0, 0.0), repr=False)

    def start(self) -> None:
        self._t0 = (cpu_seconds(self.pid), time.perf_counter())

    def stop(self) -> None:
        self.cpu = cpu_seconds(self.pid) - self._t0[0]
        self.wall = time.perf_counter() - self._t0[1]


def raise_fd_limit(want: int | None = None) -> int:
    """Raise this process's soft RLIMIT_NOFILE (to ``want``, at most the hard limit); children
    started afterwards inherit it. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None or (hard != resource.RLIM_INFINITY and want > hard) else want
    if target == resource.RLIM_INFINITY:
        target = 1 << 20
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# --- figures and output --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def markdown_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (ready to paste into the README) under a bold title line."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = (str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "| " + " | ".join([first, *rest]) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"\n**{title}**\n", line(header), sep, *(line(r) for r in rows)])


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                return row.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(packages: Sequence[str] = ("trio", "hypercorn", "starlette", "sse-starlette")) -> str:
    """One line describing the machine and the versions that matter for the figures."""
    uname = platform.uname()
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)
    return (
        f"machine: {os.cpu_count()} CPUs, {_cpu_model()}, {uname.system} {uname.release} "
        f"{uname.machine}, Python {platform.python_version()}, {versions}"
    )


def silent_wav(seconds: float, rate: int = 16_000) -> bytes:
    """A mono 16-bit WAV of silence."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * round(seconds * rate))
    return buf.getvalue()


# --- a lean HTTP/1.1 SSE client -----------------------------------------------------------------


def upload_request(
    host: str,
    port: int,
    target: str,
    body: bytes,
    content_type: str,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """A complete keep-alive ``POST`` with a raw body (the gateway accepts ``audio/*`` bodies),
    plus any extra ``headers``."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nAccept: text/event-stream\r\n{extra}\r\n"
    )
    return head.encode() + body


class SSEReader:
    """Reads one HTTP/1.1 response with a chunked SSE body from a trio stream.

    :meth:`head` reads the status line and headers; :meth:`events` yields each complete SSE
    frame (up to and including its blank line, comments included) with the ``perf_counter`` time
    of the read that completed it. Bytes past the response stay buffered for the next one on a
    keep-alive connection.
    """

    def __init__(self, stream: trio.abc.Stream, bufsize: int = 65_536) -> None:
        self.stream = stream
        self.bufsize = bufsize
        self._buf = bytearray()
        self.status = 0
        self.headers: dict[bytes, bytes] = {}

    async def _fill(self) -> float:
        data = await self.stream.receive_some(self.bufsize)
        if not data:
            raise EOFError("the server closed the connection")
        self._buf += data
        return time.perf_counter()

    async def head(self) -> int:
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            await self._fill()
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        self.status = int(lines[0].split(None, 2)[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()
        return self.status

    async def body(self) -> bytes:
        """The whole body (chunked or with Content-Length), for non-SSE responses."""
        if b"content-length" in self.headers:
            n = int(self.headers[b"content-length"])
            while len(self._buf) < n:
                await self._fill()
            data = bytes(self._buf[:n])
            del self._buf[:n]
            return data
        return b"".join([frame async for frame, _ in self.events()])

    async def events(self) -> Any:
        """Yield ``(frame, arrival_time)`` per SSE frame until the final empty chunk."""
        pending = bytearray()  # de-chunked body bytes not yet forming a whole frame
        now = time.perf_counter()
        while True:
            # One chunk: "<hex size>\r\n<data>\r\n"; size 0 ends the body.
            while (eol := self._buf.find(b"\r\n")) < 0:
                now = await self._fill()
            size = int(self._buf[:eol].split(b";", 1)[0], 16)
            while len(self._buf) < eol + 2 + size + 2:
                now = await self._fill()
            start = eol + 2
            if size == 0:
                del self._buf[: start + 2]
                if pending:
                    yield bytes(pending), now
                return
            pending += self._buf[start : start + size]
            del self._buf[: start + size + 2]
            while (cut := pending.find(b"\r\n\r\n")) >= 0:
                yield bytes(pending[: cut + 4]), now
                del pending[: cut + 4]
