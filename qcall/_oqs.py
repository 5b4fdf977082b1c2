"""Optional liboqs backend (liboqs-python), used only when liboqs is installed.

liboqs-python's ``import oqs`` tries to download and build liboqs when it
cannot find the shared library. qcall never lets that happen: it looks for
the library first and imports ``oqs`` only when one is present.
"""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

from qcall.exceptions import BackendUnavailableError

__all__ = ["OQSBackend", "liboqs_library_path"]


def liboqs_library_path() -> str | None:
    """Return the path of an installed liboqs shared library, or ``None``.

    Looks where liboqs-python itself would (``OQS_INSTALL_PATH``, ``~/_oqs``)
    and in the system's library path, without importing ``oqs``.
    """
    candidates: list[Path] = []
    for root in (os.environ.get("OQS_INSTALL_PATH"), str(Path.home() / "_oqs")):
        if root:
            for sub in ("lib", "lib64", "bin"):
                candidates.extend(Path(root, sub).glob("liboqs.so*"))
                candidates.extend(Path(root, sub).glob("liboqs*.dylib"))
                candidates.extend(Path(root, sub).glob("oqs.dll"))
    for path in candidates:
        if path.is_file():
            return str(path)
    return ctypes.util.find_library("oqs")


class OQSBackend:
    """Placeholder until the liboqs backend lands; refuses clearly."""

    name = "oqs"

    def __init__(self) -> None:
        if liboqs_library_path() is None:
            raise BackendUnavailableError(
                "the 'oqs' backend needs the liboqs shared library, which is not installed: "
                "build and install liboqs (https://github.com/open-quantum-safe/liboqs), "
                "set OQS_INSTALL_PATH to its prefix, then pip install 'qcall[oqs]'"
            )
        raise BackendUnavailableError("the 'oqs' backend is not implemented yet")
