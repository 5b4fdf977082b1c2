"""``qcall send/inbox/chat/history/group`` against a real signaling server process.

Each user has its own qcall home; the server is ``python -m signaling`` on a
loopback port with its SQLite mailbox, killed with SIGKILL in the resume test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qcall.cli import main
from qcall.qkd.keyfile import create_key_files
from tests.utils import TIMEOUT_FACTOR

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
T = 30 * TIMEOUT_FACTOR


class ServerProcess:
    """``python -m signaling`` on a fixed loopback port, restartable on it."""

    def __init__(self, db: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.db = db
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "signaling", "--port", str(self.port), "--mailbox",
             str(self.db)],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert "listening" in self.proc.stdout.readline()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def waiting(self, recipient: str) -> int:
        with sqlite3.connect(self.db) as db:
            row = db.execute(
                "SELECT COUNT(*) FROM envelopes WHERE recipient = ?", (recipient,)
            ).fetchone()
        return int(row[0])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path / "server.db")
    srv.start()
    yield srv
    srv.kill()


class Users:
    def __init__(self, tmp: Path, server: ServerProcess) -> None:
        self.tmp, self.server = tmp, server
        self.extra: dict[str, list[str]] = {}

    def home(self, name: str) -> Path:
        return self.tmp / name

    def new(self, *names: str) -> None:
        for name in names:
            assert main(["--home", str(self.home(name)), "identity", "new", "--name", name]) == 0
            self.run(name, "inbox")  # publishes prekeys

    def args(self, name: str, *argv: str) -> list[str]:
        head = ["--home", str(self.home(name)), *argv[:1]]
        if argv[:1] == ("group",):
            head, argv = [*head, argv[1]], argv[1:]
        return [*head, *argv[1:], "--signaling", self.server.url, *self.extra.get(name, [])]

    def run(self, name: str, *argv: str) -> int:
        return main(self.args(name, *argv))


@pytest.fixture
def users(tmp_path: Path, server: ServerProcess) -> Users:
    return Users(tmp_path, server)


def lines(capsys: pytest.CaptureFixture[str]) -> list[Any]:
    return [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]


def test_send_inbox_history_marked_pqc(users: Users, capsys: pytest.CaptureFixture[str]) -> None:
    users.new("alice", "bob")
    capsys.readouterr()
    assert users.run("alice", "send", "bob", "hello bob") == 0
    out = capsys.readouterr().out
    assert "sent message to bob · pqc (no QKD key source: ML-KEM only)" in out
    assert users.run("bob", "inbox", "--json") == 0
    (message,) = lines(capsys)
    assert message["text"] == "hello bob" and message["mode"] == "pqc"
    assert message["from"] == "alice"
    assert users.run("bob", "inbox") == 0
    assert "no new messages" in capsys.readouterr().out  # delivered once
    assert users.run("alice", "inbox", "--json") == 0  # bob's delivered receipt
    assert [x["status"] for x in lines(capsys)] == ["delivered"]
    users.run("alice", "send", "bob", "second, about lunch")
    capsys.readouterr()
    assert users.run("alice", "history", "bob", "--grep", "LUNCH", "--json") == 0
    (row,) = lines(capsys)
    assert row["text"] == "second, about lunch" and row["outgoing"]
    assert users.run("alice", "history", "bob") == 0
    assert "→ hello bob ✓✓" in capsys.readouterr().out


def test_qkd_key_source_makes_hybrid_sessions(
    users: Users, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    create_key_files("alice", tmp_path / "a.keys", "bob", tmp_path / "b.keys", 10)
    users.extra = {
        "alice": ["--key-source", f"keyfile:{tmp_path / 'a.keys'}"],
        "bob": ["--key-source", f"keyfile:{tmp_path / 'b.keys'}"],
    }
    users.new("alice", "bob")
    capsys.readouterr()
    assert users.run("alice", "send", "bob", "quantum hello", "--json") == 0
    (sent,) = lines(capsys)
    assert sent["mode"] == "hybrid"
    assert users.run("bob", "inbox", "--json") == 0
    (message,) = lines(capsys)
    assert message["text"] == "quantum hello" and message["mode"] == "hybrid"


def test_file_integrity_and_size_limit(
    users: Users, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users.new("alice", "bob")
    data = os.urandom(700_000)  # three chunks
    (tmp_path / "report.bin").write_bytes(data)
    capsys.readouterr()
    assert users.run("alice", "send", "bob", "--file", str(tmp_path / "report.bin")) == 0
    assert users.run("bob", "inbox", "--json") == 0
    events = lines(capsys)
    (received,) = [e for e in events if e["event"] == "file"]
    assert received["sha256_match"] and Path(received["path"]).read_bytes() == data
    before = users.server.waiting("bob")
    code = users.run(
        "alice", "send", "bob", "--file", str(tmp_path / "report.bin"), "--max-file-size", "1000"
    )
    assert code == 1
    assert "over the file size limit of 1000 bytes" in capsys.readouterr().err
    assert users.server.waiting("bob") == before  # refused before upload


def test_groups_create_send_remove(users: Users, capsys: pytest.CaptureFixture[str]) -> None:
    users.new("alice", "bob", "carol")
    assert users.run("alice", "group", "create", "team", "bob", "carol") == 0
    assert users.run("alice", "send", "@team", "hi all") == 0
    for name in ("bob", "carol"):
        capsys.readouterr()
        assert users.run(name, "inbox", "--json") == 0
        got = [e for e in lines(capsys) if e["event"] == "message"]
        assert [(e["conversation"], e["text"]) for e in got] == [("@team", "hi all")]
    assert users.run("alice", "group", "remove", "team", "carol") == 0
    assert users.run("alice", "send", "@team", "not for carol") == 0
    capsys.readouterr()
    assert users.run("carol", "inbox", "--json") == 0
    events = lines(capsys)
    assert [e["event"] for e in events] == ["group"] and events[0]["left"]
    assert users.run("bob", "inbox", "--json") == 0
    assert "not for carol" in [e.get("text") for e in lines(capsys)]
    assert users.run("carol", "group", "list", "--json") == 0
    (team,) = json.loads(capsys.readouterr().out)
    assert team["group"] == "@team" and not team["member"]


def test_chat_shows_live_messages_and_sends_lines(users: Users) -> None:
    users.new("alice", "bob")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcall", *users.args("bob", "chat", "alice")],
        cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert "chat with alice" in proc.stdout.readline()
        assert users.run("alice", "send", "bob", "are you there?") == 0
        assert "alice: are you there?" in proc.stdout.readline()  # pushed, live
        proc.stdin.write("yes, here\n")
        proc.stdin.flush()
        assert "→ yes, here  ✓" in proc.stdout.readline()
        proc.stdin.write("/quit\n")
        proc.stdin.flush()
        assert proc.wait(T) == 0
    finally:
        proc.kill()
    assert users.run("alice", "history", "bob", "--json") == 0  # bob read it, and replied


def test_file_upload_resumes_after_the_server_is_killed(
    users: Users, server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users.new("alice", "bob")
    data = os.urandom(40 * 1024 * 1024)  # 160 chunks
    (tmp_path / "big.bin").write_bytes(data)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcall", *users.args("alice", "send", "bob", "--file",
                                                   str(tmp_path / "big.bin"))],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + T
    while server.waiting("bob") < 10:  # the upload is under way
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    server.kill()
    server.start()
    out, err = proc.communicate(timeout=T)
    assert proc.returncode == 0, err
    assert "resuming" in err and "sent file big.bin" in out
    capsys.readouterr()
    assert users.run("bob", "inbox", "--json") == 0
    (received,) = [e for e in lines(capsys) if e["event"] == "file"]
    assert Path(received["path"]).read_bytes() == data


def test_messages_from_a_certified_colleague_show_the_organisation(
    users: Users, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11: a colleague certified by a trusted authority is verified by the
    organisation, no trust on first use; an uncertified sender shows as unverified."""
    from qcall.identity import Identity
    from qcall.org import Authority, OrgTrust

    users.new("alice", "bob", "carol")
    org = Authority.create(tmp_path / "ca", "Hefei Municipal")
    member = org.issue("alice", Identity.load(users.home("alice")).public_key, department="Audit")
    trust = OrgTrust.in_home(users.home("bob"))
    trust.trust((org.directory / "authority.pem").read_bytes())
    trust.update_crl((org.directory / "crl.pem").read_bytes())
    trust.import_member(org.issued_path(member.serial).read_bytes())
    capsys.readouterr()
    assert users.run("alice", "send", "bob", "signed off") == 0
    assert users.run("carol", "send", "bob", "who am I") == 0
    capsys.readouterr()
    assert users.run("bob", "inbox", "--json") == 0
    got = {m["from"]: m for m in lines(capsys)}
    assert got["alice"]["trust"] == "organisation: alice (Audit) of Hefei Municipal"
    assert got["carol"]["trust"] == "unverified"
    assert users.run("alice", "send", "bob", "and again") == 0  # an established session
    capsys.readouterr()
    assert users.run("bob", "inbox") == 0
    out = capsys.readouterr().out
    assert "alice: and again  (pqc, verified by the organisation: alice (Audit) of Hefei" in out
