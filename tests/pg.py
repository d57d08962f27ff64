"""A throwaway PostgreSQL cluster for tests: ``initdb`` and ``pg_ctl`` in a temp folder, on a
free loopback port, as an unprivileged user; stopped and removed at exit.

Debian's binaries are used (``/usr/lib/postgresql/<version>/bin``, the highest version, else
``initdb`` on PATH). Without them a test skips, or fails under ``CI=true`` (``.ci/run`` installs
Debian's ``postgresql`` as root). initdb refuses to run as root, so as root every PostgreSQL
program runs through ``runuser -u postgres`` (the user Debian's package creates; ``nobody``
otherwise), in a data folder made by ``mkdtemp`` directly under /tmp and given to that user:
pytest's own temp folders are private to root and that user could not reach them.

Usage: the session fixture ``pg_server`` (tests/conftest.py) shares one cluster, and ``pg_url``
gives each test a fresh database on it. A test that stops or restarts PostgreSQL runs its own
``with pg_server() as server:``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

__all__ = ["PgServer", "pg_binaries", "pg_server"]

_TIMEOUT = 60  # seconds for any one initdb / pg_ctl run


def pg_binaries() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``: skip (fail under CI) if none."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.parent.parent.name))

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=version)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl", path=str(Path(initdb).parent)):
        return Path(initdb).parent
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but no PostgreSQL binaries: .ci/run installs Debian's postgresql")
    pytest.skip("no PostgreSQL binaries (apt-get install postgresql, or run .ci/run as root)")


def _free_port() -> int:
    # Bound and released at once: postgres needs a number. A clash shows up as a failed start,
    # which the first start retries on another port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgServer:
    """One running cluster on 127.0.0.1:``port``; the superuser is ``gateway``, no password."""

    def __init__(self, bin_dir: Path, data_dir: Path, run_as: str | None) -> None:
        self.bin_dir = bin_dir
        self.data_dir = data_dir
        self.port = 0
        self.log_file = data_dir / "postgres.log"
        self._prefix = ["runuser", "-u", run_as, "--"] if run_as is not None else []

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://gateway@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, uniquely named database; returns its URL."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def start(self) -> None:
        """Start the cluster (again): same port, same data. Raises with the log's tail."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port}"
            f" -c unix_socket_directories={self.data_dir} -c fsync=off"
        )
        done = self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options,
            "-w", "-t", str(_TIMEOUT), "start", check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(
                f"PostgreSQL did not start on port {self.port}: {done.stdout}{done.stderr}\n"
                f"--- {self.log_file} (tail) ---\n{self.log_tail()}"
            )

    def stop(self, mode: str = "fast") -> None:
        """Stop: "fast" (a clean shutdown) or "immediate" (a crash: recovery at the next start)."""
        if mode not in ("fast", "immediate"):
            raise ValueError(f"stop mode {mode!r}: use 'fast' or 'immediate'")
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def _run(
        self, program: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self._prefix, str(self.bin_dir / program), *args],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT + 10,
            env={**os.environ, "LC_ALL": "C"},
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}"
            )
        return done


def _unprivileged_user() -> str | None:
    """The user to run PostgreSQL as: None (oneself) unless root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    pytest.fail("running as root, and neither a postgres nor a nobody user to run PostgreSQL as")


@contextmanager
def pg_server() -> Iterator[PgServer]:
    """initdb a fresh cluster and start it; at exit stop it and remove its folder."""
    bin_dir = pg_binaries()
    run_as = _unprivileged_user()
    data_dir = Path(tempfile.mkdtemp(prefix="asr-gateway-pg-", dir="/tmp"))
    try:
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            os.chown(data_dir, entry.pw_uid, entry.pw_gid)
        server = PgServer(bin_dir, data_dir, run_as)
        server._run(
            "initdb", "-D", str(data_dir), "-A", "trust", "-U", "gateway", "--no-sync",
            "-E", "UTF8", "--locale=C", "--no-instructions",
        )  # fmt: skip
        for attempt in range(3):
            server.port = _free_port()
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == 2 or "already in use" not in server.log_tail():
                    raise
        try:
            yield server
        finally:
            # A test may have stopped it already: then pg_ctl just says so.
            server._run("pg_ctl", "-D", str(data_dir), "-m", "immediate", "-w", "stop", check=False)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
