"""The set-up every qcall SQLite store repeats: durable pragmas and schema migrations.

A store opens its connection, calls :func:`durable` and :func:`schema_version`,
then runs :func:`migrate` inside its own write transaction (how it takes that
transaction, and what else it does in it, is the store's business).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path

from qcall.exceptions import QCallError

__all__ = ["durable", "migrate", "schema_version"]


def durable(db: sqlite3.Connection) -> None:
    """WAL, ``synchronous=FULL`` (a commit is on disk when it returns), a 10 s busy wait."""
    db.execute("PRAGMA busy_timeout = 10000")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")


def schema_version(
    db: sqlite3.Connection, path: Path, latest: int, error: type[QCallError]
) -> int:
    """The file's schema version (``PRAGMA user_version``; 0: new).

    Raises:
        error: the file was written by a newer qcall (a version above ``latest``).
    """
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > latest:
        raise error(
            f"{path} has schema version {version}, written by a newer qcall "
            f"(this one knows up to {latest})"
        )
    return version


def migrate(
    db: sqlite3.Connection, migrations: Mapping[int, str], version: int, target: int
) -> list[int]:
    """Run the migrations after ``version`` up to ``target``, each ending with its
    ``user_version``; call it inside a write transaction. Returns the versions applied."""
    applied = []
    for step in range(version + 1, target + 1):
        for statement in migrations[step].split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {step}")
        applied.append(step)
    return applied
