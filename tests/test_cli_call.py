"""``qcall call`` / ``qcall listen``: settings and clear errors before any network I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcall.cli import main
from qcall.identity import Identity


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    Identity.generate("alice").save(home)
    return home


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_call_without_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--home", str(tmp_path / "empty"), "call", "bob", "--tone", "440")
    assert code == 1 and "identity" in out.lower()


def test_hybrid_without_key_source(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--home", str(home), "call", "bob", "--tone", "440")
    assert code == 1
    assert "no QKD key source" in out and "--allow-pqc-only" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("signaling = 3\n", "wrong type"),
        ("colour = 'blue'\n", "unknown setting 'colour'"),
        ("policy = [\n", "not valid TOML"),
        ("allow_pqc_only = 'yes'\n", "wrong type"),
        ("ice_policy = 'sideways'\n", "ice_policy must be all or relay, not 'sideways'"),
    ],
)
def test_bad_config_is_named(
    home: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config = home / "config.toml"
    config.write_text(text)
    code, out = run(capsys, "--home", str(home), "call", "bob", "--tone", "440")
    assert code == 1 and message in out


def test_missing_config_file(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--home", str(home), "listen", "--config", str(home / "nope.toml"))
    assert code == 1 and "does not exist" in out


def test_bad_network_file(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    network = tmp_path / "network.json"
    network.write_text('{"saes": {}}')
    code, out = run(capsys, "--home", str(home), "call", "bob", "--tone", "440",
                    "--network", str(network))  # fmt: skip
    assert code == 1 and "no usable entry for SAE 'alice'" in out


def test_bad_input_file(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--home", str(home), "call", "bob", "--policy", "pqc",
                    "--input", str(home / "missing.ogg"))  # fmt: skip
    assert code == 1 and "missing.ogg" in out


def test_signaling_unreachable(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "--home", str(home), "call", "bob", "--policy", "pqc", "--tone",
                    "440", "--signaling", "ws://127.0.0.1:9", "--quiet")  # fmt: skip
    assert code == 1 and "cannot connect" in out


def test_help_lists_call_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["call", "--help"])
    out = capsys.readouterr().out
    for flag in ("--allow-pqc-only", "--rekey-interval", "--tone", "--output", "--network",
                 "--ice-policy"):  # fmt: skip
        assert flag in out
