"""Shared pytest configuration.

Timeouts in tests scale with ``QCALL_TESTS_TIMEOUT_FACTOR`` (see :mod:`tests.utils`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: Key hygiene over the whole run: secrets registered, logs/exceptions/reprs scanned.
#: The ``oqs_standin`` fixture: the liboqs backend over a stand-in liboqs-python.
#: Real Redis, PostgreSQL and coturn servers: tests/services.py.
pytest_plugins = ["tests.hygiene", "tests.oqs_standin", "tests.services"]


@pytest.fixture
def qcall_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty qcall home directory, also exported as ``QCALL_HOME``."""
    home = tmp_path / "home"
    monkeypatch.setenv("QCALL_HOME", str(home))
    return home
