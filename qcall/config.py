"""Where qcall keeps its files, and how it writes secrets to disk.

The qcall home holds the identity, contacts and key files. It is, in order:
the ``--home`` flag, ``$QCALL_HOME``, ``$XDG_CONFIG_HOME/qcall``, ``~/.config/qcall``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from qcall.exceptions import ConfigError

__all__ = ["atomic_write", "make_private_dir", "qcall_home", "read_private_file"]

#: Mode of every file holding secret material.
PRIVATE_MODE = 0o600


def qcall_home(override: str | os.PathLike[str] | None = None, *, create: bool = True) -> Path:
    """Return (and by default create, mode 0700) the qcall home directory."""
    if override:
        home = Path(override)
    elif os.environ.get("QCALL_HOME"):
        home = Path(os.environ["QCALL_HOME"])
    elif os.environ.get("XDG_CONFIG_HOME"):
        home = Path(os.environ["XDG_CONFIG_HOME"]) / "qcall"
    else:
        home = Path.home() / ".config" / "qcall"
    home = home.expanduser()
    if create:
        try:
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create qcall home {home}: {exc.strerror}") from exc
    return home


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) with mode 0700 if missing; return it.

    Raises:
        ConfigError: it cannot be created.
    """
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc
    return path


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = PRIVATE_MODE) -> None:
    """Write ``data`` to ``path`` atomically, with ``mode`` from the first byte.

    The file is written to a temporary file in the same directory (created
    with ``mode``, so secrets are never world-readable, not even briefly),
    flushed and fsynced, then renamed over ``path``; the directory is fsynced
    too. A crash leaves either the old or the new content, never a mix.
    """
    path = Path(path)
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_private_file(path: str | os.PathLike[str]) -> bytes:
    """Read a secret file, refusing one that others can read or write."""
    path = Path(path)
    try:
        st = path.stat()
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{path} is accessible by other users (mode {st.st_mode & 0o777:o}); "
                f"run: chmod 600 {path}"
            )
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
