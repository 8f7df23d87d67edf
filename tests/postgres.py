"""A throw-away PostgreSQL server on a free loopback port, from Debian's packages, for tests."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from dicom_node.database import create_index_engine
from dicom_node.index_schema import upgrade_index
from tests.dicom_peers import free_port


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """A cluster (trust authentication, loopback only) in a temporary directory; :meth:`stop` and :meth:`start`
    take it away and bring it back on the same port, as an outage would."""

    def __init__(self) -> None:
        binaries = postgres_bin()
        assert binaries is not None, "PostgreSQL is not installed (make system-packages)"
        self.binaries = binaries
        self.base = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.base, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.data, self.port = self.base / "data", free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._run(self.binaries / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            self.binaries / "pg_ctl", "-D", self.data, "-o", options, "-l", self.base / "server.log", "-w", "start"
        )

    def stop(self) -> None:
        self._run(self.binaries / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def _run(self, *command: object) -> None:
        subprocess.run([*self.as_postgres, *map(str, command)], check=True, capture_output=True, timeout=120)


@contextmanager
def temporary_postgres() -> Iterator[str]:
    """Start a cluster and yield its SQLAlchemy URL; remove it after."""
    with running_postgres() as server:
        yield server.url


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.remove()


def psycopg_url(url: str) -> str:
    """The SQLAlchemy URL ``url`` as psycopg takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(admin_url: str, name: str) -> str:
    """A new empty database on the server of ``admin_url``; its URL."""
    with psycopg.connect(psycopg_url(admin_url), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def migrated_database(admin_url: str, name: str) -> str:
    """A new database at the code's schema, as an operator leaves it with ``dicom-node db upgrade``; its URL."""
    url = create_database(admin_url, name)
    engine = create_index_engine(url)
    try:
        upgrade_index(engine)
    finally:
        engine.dispose()
    return url
