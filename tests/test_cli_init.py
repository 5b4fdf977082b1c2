"""``qcall init``: identity plus a commented config.toml; config paths relative to its folder."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pytest

from qcall.cli import main
from qcall.cli.settings import load_config
from qcall.identity import Identity


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err + captured.out


class _Terminal(io.StringIO):
    """Standard input that says it is a terminal (the answers typed in order)."""

    def isatty(self) -> bool:
        return True


def test_non_interactive_simulated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "alice"
    network = tmp_path / "qnet" / "network.json"
    code, out = run(capsys, "--home", str(home), "init", "--name", "alice", "--yes",
                    "--signaling", "ws://127.0.0.1:9999", "--network", str(network))  # fmt: skip
    assert code == 0, out
    assert Identity.load(home).name == "alice"
    text = (home / "config.toml").read_text()
    assert text.count("\n#") >= 5  # commented
    assert tomllib.loads(text) == {
        "signaling": "ws://127.0.0.1:9999", "policy": "hybrid", "allow_pqc_only": False,
        "rekey_interval": 30, "network": str(network),
    }  # fmt: skip
    assert "qcall network" in out  # the network is not running yet: says how to start it
    # A second run does not clobber it.
    code, out = run(capsys, "--home", str(home), "init", "--name", "alice", "--yes")
    assert code == 1 and "--force" in out


def test_kme_files_relative_to_the_config_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "bob"
    home.mkdir()
    for name in ("bob.pem", "bob.key", "ca.pem"):
        (home / name).write_text("x")
    monkeypatch.chdir(home)  # the user names the files as they see them
    code, out = run(capsys, "--home", str(home), "init", "--name", "bob", "--kme",
                    "https://kme-b:8443", "--cert", "bob.pem", "--key", "bob.key",
                    "--ca", "ca.pem", "--yes")  # fmt: skip
    assert code == 0, out
    raw = tomllib.loads((home / "config.toml").read_text())
    assert raw["key_source"] == {"type": "etsi014", "url": "https://kme-b:8443",
                                 "cert": "bob.pem", "key": "bob.key", "ca": "ca.pem"}  # fmt: skip
    monkeypatch.chdir(tmp_path)  # read from elsewhere: the names still mean the home's files
    conf = load_config(None, home)
    assert conf["key_source"]["cert"] == str(home / "bob.pem")
    assert conf["key_source"]["ca"] == str(home / "ca.pem")


def test_missing_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.pem")
    code, out = run(capsys, "--home", str(tmp_path / "h"), "init", "--name", "bob", "--yes",
                    "--kme", "https://kme-b:8443", "--cert", missing)  # fmt: skip
    assert code == 1 and "nope.pem" in out
    assert not (tmp_path / "h" / "config.toml").exists()


def test_interactive_questions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "carol"
    ca = tmp_path / "server-ca.pem"
    ca.write_text("x")
    answers = ["carol", "wss://signal.example:8443", str(ca), "none"]
    monkeypatch.setattr("sys.stdin", _Terminal("\n".join(answers) + "\n"))
    code, out = run(capsys, "--home", str(home), "init")
    assert code == 0, out
    assert "Your name" in out and "Signaling server URL" in out and "QKD keys from" in out
    conf = load_config(None, home)
    assert conf["signaling"] == "wss://signal.example:8443"
    assert conf["signaling_ca"] == str(ca) and conf["policy"] == "pqc"
    assert "key_source" not in conf and "network" not in conf


def test_name_must_match_existing_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "h"
    home.mkdir()
    Identity.generate("dave").save(home)
    code, out = run(capsys, "--home", str(home), "init", "--name", "erin", "--no-qkd", "--yes")
    assert code == 1 and "dave" in out and "erin" in out
    code, out = run(capsys, "--home", str(home), "init", "--no-qkd", "--yes")
    assert code == 0 and Identity.load(home).name == "dave"


def test_docs_example_is_a_valid_config(tmp_path: Path) -> None:
    import re

    docs = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    example = re.findall(r"```toml\n(.*?)```", docs.read_text(), re.S)[0]
    (tmp_path / "config.toml").write_text(example)
    conf = load_config(None, tmp_path)
    assert conf["key_source"]["cert"] == str(tmp_path / "alice.pem")
    assert conf["signaling_ca"] == str(tmp_path / "signal-ca.pem")


def test_ctrl_c_says_what_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("qcall.cli.init.run", interrupted)
    code, out = run(capsys, "--home", str(tmp_path), "init", "--name", "x", "--yes")
    assert code == 130 and "interrupted: stopped `qcall init`" in out


def test_config_paths_hostile_values(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'network = "~no-such-user-qcall/net.json"\nsignaling_ca = "/abs/ca.pem"\n'
        '[key_source]\ncert = 3\nurl = "keyfile:keys.json"\n'
    )
    conf = load_config(None, tmp_path)
    assert conf["network"] == str(tmp_path / "~no-such-user-qcall/net.json")
    assert conf["signaling_ca"] == "/abs/ca.pem"
    assert conf["key_source"]["cert"] == 3  # wrong types are the key source's to refuse
    assert conf["key_source"]["url"] == f"keyfile:{tmp_path / 'keys.json'}"
