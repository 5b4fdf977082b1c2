"""``qcall org``, ``qcall seal`` and ``qcall seal-log`` end to end, as users run them.

The log is a real ``qcall seal-log serve`` process with HTTPS on a loopback port;
every other command runs in-process through ``qcall.cli.main``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcall.cli import main
from tests.utils import TIMEOUT_FACTOR as T

ROOT = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], home: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["--home", str(home), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def org(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[dict[str, Path]]:
    """An organisation, alice/bob/carol certified, a log served over HTTPS, all configured."""
    homes = {n: tmp_path / n for n in ("admin", "alice", "bob", "carol")}
    ca = homes["admin"] / "org" / "authority"
    assert run(capsys, homes["admin"], "org", "init", "--name", "Hefei Municipal")[0] == 0
    for name in ("alice", "bob", "carol"):
        home = homes[name]
        assert run(capsys, home, "identity", "new", "--name", name)[0] == 0
        (tmp_path / f"{name}.json").write_text(run(capsys, home, "identity", "show", "--json")[1])
        code, out, _ = run(
            capsys,
            homes["admin"],
            "org",
            "issue",
            name,
            "--key",
            str(tmp_path / f"{name}.json"),
            "--department",
            "Finance",
            "--out",
            str(tmp_path / f"{name}.pem"),
        )
        assert code == 0 and "serial" in out
        assert (
            run(
                capsys,
                home,
                "org",
                "trust",
                str(ca / "authority.pem"),
                "--crl",
                str(ca / "crl.pem"),
            )[0]
            == 0
        )
        assert run(capsys, home, "org", "install", str(tmp_path / f"{name}.pem"))[0] == 0
    log = tmp_path / "log"
    code, out, _ = run(
        capsys,
        homes["admin"],
        "seal-log",
        "init",
        str(log),
        "--name",
        "Hefei log",
        "--authority",
        str(ca / "authority.pem"),
        "--crl",
        str(ca / "crl.pem"),
    )
    assert code == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcall", "seal-log", "serve", str(log), "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "serving https://" in line, line
        url = line.split("serving ")[1].strip()
        for name in ("alice", "bob", "carol"):
            assert (
                run(
                    capsys,
                    homes[name],
                    "seal",
                    "trust-log",
                    str(log / "log.pub"),
                    "--url",
                    url,
                    "--ca",
                    str(log / "tls" / "ca.pem"),
                )[0]
                == 0
            )
            assert (
                run(
                    capsys, homes[name], "seal", "setup", "--workflows", str(tmp_path / "workflows")
                )[0]
                == 0
            )
        yield {**homes, "ca": ca, "log": log, "root": tmp_path}
    finally:
        proc.terminate()
        proc.wait(10 * T)


def test_sign_and_verify(org: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    doc = org["root"] / "contract.txt"
    doc.write_text("pay 1000 yuan")
    code, out, _ = run(capsys, org["alice"], "seal", "sign", str(doc), "--reason", "approved")
    assert code == 0 and "log entry 0 of 1" in out
    assert Path(str(doc) + ".qseal").exists()
    code, out, _ = run(capsys, org["bob"], "seal", "verify", str(doc))
    assert code == 0
    assert out.startswith("VALID: seal of 'contract.txt'")
    assert "alice (Finance) of Hefei Municipal" in out and "'approved'" in out
    assert "inclusion proof verified" in out
    code, out, _ = run(capsys, org["bob"], "seal", "verify", str(doc), "--json")
    report = json.loads(out)
    assert report["verified"] and report["inclusion_verified"] and report["log_size"] == 1
    # An outsider with nothing but the authority certificate, its CRL and the log key.
    code, out, _ = run(
        capsys,
        org["root"] / "outsider",
        "seal",
        "verify",
        str(doc),
        "--authority",
        str(org["ca"] / "authority.pem"),
        "--crl",
        str(org["ca"] / "crl.pem"),
        "--log-key",
        str(org["log"] / "log.pub"),
    )
    assert code == 0 and out.startswith("VALID")
    # Tampered document: a clear verdict and exit code 1.
    doc.write_text("pay 9000 yuan")
    code, out, _ = run(capsys, org["bob"], "seal", "verify", str(doc))
    assert code == 1 and "FAILED [document_changed]" in out
    # The outsider who trusts nobody.
    code, out, _ = run(capsys, org["root"] / "nobody", "seal", "verify", str(doc))
    assert code == 1 and "certificate_untrusted" in out and "not_in_log" not in out


def test_approval_workflow(org: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    doc = org["root"] / "budget.txt"
    doc.write_text("budget 2027")
    code, out, _ = run(
        capsys,
        org["alice"],
        "seal",
        "request",
        str(doc),
        "--approvers",
        "bob,carol",
        "--reason",
        "please approve",
    )
    assert code == 0 and "waiting for bob" in out
    wid = out.split("workflow  ")[1].split()[0]
    code, out, _ = run(capsys, org["bob"], "seal", "inbox")
    assert wid in out and "review" in out
    assert "Nothing waiting" in run(capsys, org["carol"], "seal", "inbox")[1]
    code, _, err = run(capsys, org["carol"], "seal", "approve", wid)
    assert code == 1 and "out of order: waiting for bob, not carol" in err
    code, out, _ = run(capsys, org["bob"], "seal", "approve", wid, "--reason", "figures ok")
    assert code == 0 and "pending (1 of 2: bob; waiting for carol)" in out
    assert "Nothing waiting" in run(capsys, org["bob"], "seal", "inbox")[1]
    assert wid in run(capsys, org["carol"], "seal", "inbox")[1]
    code, out, _ = run(capsys, org["carol"], "seal", "approve", wid)
    assert code == 0 and "approved (2 of 2: bob, carol)" in out
    assert "approved" in run(capsys, org["alice"], "seal", "inbox")[1]
    code, out, _ = run(capsys, org["alice"], "seal", "verify", str(doc))
    assert code == 0 and "approvals APPROVED" in out and "'figures ok'" in out
    code, out, _ = run(capsys, org["alice"], "seal", "status", wid[:10], "--json")
    assert json.loads(out)["workflow"]["state"] == "approved"
    code, _, err = run(capsys, org["bob"], "seal", "approve", wid)
    assert code == 1 and "after the workflow was approved" in err
    code, out, _ = run(capsys, org["alice"], "seal", "audit")
    assert code == 0 and "consistent" in out and "1 signed with your key" in out


def test_revocation_and_reject(org: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    doc = org["root"] / "memo.txt"
    doc.write_text("memo")
    assert run(capsys, org["alice"], "seal", "sign", str(doc))[0] == 0
    code, out, _ = run(capsys, org["admin"], "org", "list", "--json")
    serial = next(s for s, e in json.loads(out).items() if e["name"] == "alice")
    assert (
        run(
            capsys,
            org["admin"],
            "org",
            "revoke",
            serial,
            "--reason",
            "key-compromise",
            "--invalid-since",
            "2000-01-01T00:00:00",
        )[0]
        == 0
    )
    crl = str(org["ca"] / "crl.pem")
    assert run(capsys, org["bob"], "org", "crl-update", crl)[0] == 0
    code, out, _ = run(capsys, org["bob"], "seal", "verify", str(doc))
    assert code == 1 and "FAILED [certificate_revoked]" in out
    # The log refuses her from now on (once it has the CRL).
    assert run(capsys, org["admin"], "seal-log", "crl-update", str(org["log"]), crl)[0] == 0
    code, _, err = run(capsys, org["alice"], "seal", "sign", str(doc))
    assert code == 1 and "revoked" in err
    # A rejection by the single approver closes an ordered workflow.
    code, out, _ = run(capsys, org["bob"], "seal", "request", str(doc), "--approvers", "carol")
    wid = out.split("workflow  ")[1].split()[0]
    code, out, _ = run(capsys, org["carol"], "seal", "reject", wid, "--reason", "not now")
    assert code == 0 and "rejected by carol: 'not now'" in out


def test_bad_usage_is_explained(org: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, org["alice"], "seal", "request", "x", "--approvers", "bob", "--any", "3"
    )
    assert code == 1 and "threshold" in err
    code, _, err = run(capsys, org["alice"], "seal", "approve", "zz")
    assert code == 1 and "not a workflow ID" in err
    junk = org["root"] / "junk.qseal"
    junk.write_text("{}")
    (org["root"] / "junk").write_text("x")
    code, _, err = run(capsys, org["alice"], "seal", "verify", str(org["root"] / "junk"))
    assert code == 1 and "not a qcall-seal file" in err
    code, _, err = run(capsys, org["root"] / "nobody", "seal", "sign", str(junk))
    assert code == 1 and "identity" in err
