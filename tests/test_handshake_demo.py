"""``qcall demo --handshake-only``: the in-process handshake demonstration."""

from __future__ import annotations

import json
import uuid

import pytest

from qcall.cli import main
from qcall.cli.handshake_demo import InMemoryKMEPair, run_handshake_demo
from qcall.exceptions import KeyNotFoundError


@pytest.mark.parametrize("policy", ["hybrid", "pqc"])
def test_demo_result(policy: str) -> None:
    result = run_handshake_demo(policy)
    assert result["policy"] == policy
    assert result["sas"]["match"] and result["sas"]["alice"] == result["sas"]["bob"]
    assert result["keys_agree"] and result["rekeyed"]
    assert result["confirmed"] == {"alice": [0, 1], "bob": [0, 1]}
    assert result["suite"]["kem"] == "ML-KEM-768" and result["suite"]["signature"] == "ML-DSA-65"
    if policy == "hybrid":
        (key_id,) = result["qkd"]["key_ids"]
        assert uuid.UUID(key_id).version == 4
        assert result["qkd"]["kme"] == ["KME-Beijing", "KME-Hefei"]
    else:
        assert result["qkd"]["key_ids"] == [] and "QKD" not in result["suite"]["secrets"]
    assert result["timings_ms"]["handshake total"] > 0


def test_demo_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--handshake-only", "--json", "--policy", "pqc"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)  # exactly one JSON object
    assert data["policy"] == "pqc" and data["sas"]["match"]


def test_demo_cli_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--handshake-only"]) == 0
    out = capsys.readouterr().out
    assert "Beijing" in out and "Hefei" in out and "SAS" in out and "equal" in out


def test_in_memory_kme_consumes_keys_once() -> None:
    kmes = InMemoryKMEPair("KME-A", "KME-B")
    (key,) = kmes.enc_keys(size=256)
    assert len(key.key) == 32 and repr(key).count(key.key_id) == 1
    assert kmes.dec_keys((key.key_id,))[0].key == key.key
    with pytest.raises(KeyNotFoundError):
        kmes.dec_keys((key.key_id,))
