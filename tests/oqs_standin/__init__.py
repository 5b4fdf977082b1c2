"""The ``oqs_standin`` fixture: qcall's ``oqs`` backend over a stand-in liboqs-python.

liboqs cannot exist on the machines this suite runs on (no network to fetch
it, no source or binary to build it from), so the real ``oqs`` backend cannot
be constructed here. What qcall itself does around liboqs-python (importing it
without printing, registering its keys' secrets for the hygiene checks,
reporting an algorithm missing from a minimal build, selecting it in the
benchmarks) is tested against the stand-in package ``oqs`` in this directory,
which mirrors liboqs-python's API and import-time output (see its docstring).
Tests that need the real library use :data:`needs_liboqs`, which skips here.

Loaded as a plugin by ``tests/conftest.py``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from qcall import _oqs, pqc

__all__ = ["STANDIN_DIR", "needs_liboqs", "oqs_standin"]

#: The directory holding the stand-in package ``oqs`` (put first on ``sys.path``).
STANDIN_DIR = Path(__file__).resolve().parent

#: For tests that need liboqs itself: they skip on machines without it, saying why.
needs_liboqs = pytest.mark.skipif(
    _oqs.liboqs_library_path() is None,
    reason="needs the real liboqs shared library, which cannot exist on this machine "
    "(no network to fetch it, no source or binary to build it from; see docs/backends.md)",
)


def _oqs_modules() -> dict[str, ModuleType]:
    return {n: m for n, m in sys.modules.items() if n == "oqs" or n.startswith("oqs.")}


@pytest.fixture
def oqs_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``pqc.get_backend("oqs")`` construct the backend over the stand-in ``oqs``.

    The liboqs probe reports a library found (the probe itself is tested on real
    files in ``test_pqc_backends.py``); ``oqs`` is not imported here, so the test
    sees qcall's own first import of it, faulthandler line included. The cache of
    backends is emptied for the test, and every trace of the stand-in (its modules,
    its logger's handlers) is removed afterwards.
    """
    saved = _oqs_modules()
    for name in saved:
        del sys.modules[name]
    lib_logger = logging.getLogger("oqs.oqs")
    handlers = list(lib_logger.handlers)
    monkeypatch.syspath_prepend(str(STANDIN_DIR))
    probe = _oqs.LibOQSProbe("<stand-in liboqs>", "0.16.0", None)
    monkeypatch.setattr(_oqs, "probe", lambda: probe)
    monkeypatch.setattr(pqc, "_BACKENDS", {})
    yield
    for name in _oqs_modules():
        del sys.modules[name]
    sys.modules.update(saved)
    lib_logger.handlers[:] = handlers
