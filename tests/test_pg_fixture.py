"""The throwaway PostgreSQL cluster (tests/pg.py): it answers, survives a crash, and restarts on
the same port with the same data."""

from __future__ import annotations

import psycopg
import pytest
from pg import PgServer, pg_server


def test_query_crash_restart_and_query_again() -> None:
    with pg_server() as server:
        url = server.create_database()
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.execute("CREATE TABLE kept (n integer)")
            conn.execute("INSERT INTO kept VALUES (42)")
        server.stop("immediate")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=5).close()
        server.start()
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT n FROM kept").fetchone() == (42,)
        data_dir = server.data_dir
    assert not data_dir.exists()


def test_each_pg_url_is_a_fresh_database(pg_server: PgServer, pg_url: str) -> None:
    other = pg_server.create_database()
    assert other != pg_url and pg_url.startswith(
        f"postgresql://gateway@127.0.0.1:{pg_server.port}/"
    )
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone() == (0,)
