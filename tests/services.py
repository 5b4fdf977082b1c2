"""Pytest fixtures: real Redis, PostgreSQL and coturn servers (signaling/local_services.py).

Each server is started once per test session on a loopback port, in a
temporary folder, and stopped at the end. A test that needs a server the
machine cannot run (the Debian package is missing: ``./run.sh test`` installs
them) is skipped, saying which package.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator

import pytest

from signaling.local_services import LocalPostgres, LocalRedis, postgres_bin

_databases = itertools.count(1)


def _need(program: str, package: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed here (apt-get install {package})")


def _postgres() -> LocalPostgres:
    try:
        postgres_bin("initdb")
    except Exception as exc:
        pytest.skip(str(exc))
    server = LocalPostgres()
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """A PostgreSQL server for the whole session (as ``nobody`` when we are root)."""
    server = _postgres()
    yield server
    server.close()


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL server of this test's own (it may stop and restart it)."""
    server = _postgres()
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres_server: LocalPostgres) -> str:
    """The URL of a new, empty database on :func:`postgres_server`."""
    return postgres_server.create_database(f"test_{next(_databases)}")


@pytest.fixture(scope="session")
def redis_session() -> Iterator[LocalRedis]:
    """A ``redis-server`` for the whole session (tests use their own database numbers)."""
    _need("redis-server", "redis-server")
    server = LocalRedis()
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_server() -> Iterator[LocalRedis]:
    """A ``redis-server`` of this test's own (it may kill or restart it)."""
    _need("redis-server", "redis-server")
    server = LocalRedis()
    server.start()
    yield server
    server.close()
