"""The README's "Two users" commands, run as written: two homes on one machine.

The commands are taken from the ``sh`` block after ``<!-- two-users -->`` in
README.md. The only changes: the venv activation line is replaced by putting
this interpreter's ``bin`` folder first on ``PATH``, and the signaling port 8765
by a free port (tests run side by side). A command ending in ``&`` runs in the
background, and the next command starts once it printed what the README says to
wait for (as a user would in another terminal).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import wave
from pathlib import Path

from tests.utils import stop_processes

ROOT = Path(__file__).resolve().parent.parent

#: What a background command prints when the next step can start.
READY = {"qcall network": "ready:", "qcall-signaling": "listening on", " listen ": "listening as"}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- two-users -->\s*```sh\n(.*?)```", text, re.S)
    assert match, "README.md has no <!-- two-users --> sh block"
    lines = [line.split("  #")[0].strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{proc.args!r} did not print {text!r}:\n{log.read_text()}")


def argv_of(proc: subprocess.Popen[bytes]) -> list[str]:
    """The argument list ``proc`` was started with (this test always passes one)."""
    assert isinstance(proc.args, list)
    return proc.args


def test_readme_two_users(tmp_path: Path) -> None:
    commands = readme_commands()
    assert commands[0].startswith(". .venv/bin/activate")
    port = str(free_port())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("QCALL_HOME", None)
    background: list[subprocess.Popen[bytes]] = []
    logs: dict[int, Path] = {}
    outputs: list[str] = []
    try:
        for index, line in enumerate(commands[1:]):
            argv = shlex.split(line.replace("8765", port))
            log = tmp_path / f"step{index}.log"
            if argv[-1] == "&":
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        argv[:-1], cwd=tmp_path, env=env, stdout=out, stderr=out,
                        stdin=subprocess.DEVNULL,
                    )  # fmt: skip
                background.append(proc)
                logs[proc.pid] = log
                ready = next(text for key, text in READY.items() if key in f" {line} ")
                wait_for(log, ready, proc, 60)
                continue
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=90)
            output = (done.stdout + done.stderr).decode(errors="replace")
            assert done.returncode == 0, f"{line}\n{output}"
            outputs.append(output)
        listener = next(proc for proc in background if "listen" in argv_of(proc))
        assert listener.wait(30) == 0, logs[listener.pid].read_text()
    finally:
        stop_processes(background)
    caller = outputs[-1]
    assert "connected to bob" in caller and "SAS" in caller and "policy hybrid" in caller
    with wave.open(str(tmp_path / "bob.wav")) as wav:
        assert wav.getnframes() > 48000  # bob recorded more than a second of alice's tone
