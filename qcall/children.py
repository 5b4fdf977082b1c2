"""Starting qcall's own Python child processes (demo users, bench callee and KMEs).

``python -m qcall`` puts the current directory first on ``sys.path``: run from a
folder that holds another checkout named ``qcall``, the child would import that
one instead of the installed package. :func:`module_argv` adds ``-P`` (Python
3.11+: no unsafe path first), so a child imports what its parent imported.

:func:`log_tail` gives the end of a child's log for error messages, so a child's
own error (its stderr) is shown rather than hidden.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["log_tail", "module_argv"]


def module_argv(module: str, *args: str) -> list[str]:
    """``[python, -P, -m, module, *args]``: run ``module`` of the installed packages."""
    return [sys.executable, "-P", "-m", module, *args]


def log_tail(path: str | os.PathLike[str], lines: int = 12) -> str:
    """The last ``lines`` lines of a child's log, indented (``""`` if unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])
