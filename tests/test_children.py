"""Children of demo/bench import the installed qcall, even from a folder with another checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qcall import __version__
from qcall.call.demo import _user
from qcall.children import log_tail, module_argv


@pytest.fixture
def other_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder holds another ``qcall`` package, which must not be imported."""
    fake = tmp_path / "qcall"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the wrong qcall checkout')\n")
    (fake / "__main__.py").write_text("raise SystemExit('the wrong qcall checkout')\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_module_argv_ignores_the_current_folder(other_checkout: Path) -> None:
    done = subprocess.run(module_argv("qcall", "--version"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"qcall {__version__}"


async def test_demo_user_process_imports_the_installed_package(other_checkout: Path) -> None:
    log = other_checkout / "user.log"
    proc = await _user(other_checkout / "home", "--version", log=log)
    assert await proc.wait() == 0, log_tail(log)
    assert f"qcall {__version__}" in log.read_text()


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    log.write_text("".join(f"line {i}\n" for i in range(20)))
    assert log_tail(log, 2) == "    line 18\n    line 19"
    assert log_tail(tmp_path / "missing.log") == ""
