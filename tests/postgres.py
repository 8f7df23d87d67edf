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


@contextmanager
def temporary_postgres() -> Iterator[str]:
    """Start a cluster (trust authentication, loopback only) and yield its SQLAlchemy URL; remove it after."""
    binaries = postgres_bin()
    assert binaries is not None, "PostgreSQL is not installed (make system-packages)"
    base = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"

    def run(*command: object) -> None:
        subprocess.run([*as_postgres, *map(str, command)], check=True, capture_output=True, timeout=120)

    run(binaries / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    run(binaries / "pg_ctl", "-D", data, "-o", options, "-l", base / "server.log", "-w", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(binaries / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


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
