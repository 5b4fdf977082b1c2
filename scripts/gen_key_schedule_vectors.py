#!/usr/bin/env python3
"""Generate ``tests/vectors/key_schedule.json`` from :mod:`qcall.handshake.keyschedule`.

Inputs are deterministic (SHA-384 of a label, truncated or repeated), so the file
is reproducible byte for byte: ``python scripts/gen_key_schedule_vectors.py``.
``tests/test_keyschedule.py`` checks the file against the implementation and
against an independent re-implementation written from ``docs/key-schedule.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from qcall.handshake.keyschedule import EpochKeys, KeySchedule, SRTPProfile, sas_commitment

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "key_schedule.json"

GCM = SRTPProfile.AEAD_AES_256_GCM
CM = SRTPProfile.AES128_CM_HMAC_SHA1_80

# (name, policy, profile, qkd bytes, exporter bytes, rekey steps [(qkd bytes, kem?)])
CASES: list[tuple[str, str, SRTPProfile, int, int, list[tuple[int, bool]]]] = [
    ("hybrid-gcm-handshake", "hybrid", GCM, 32, 88, []),
    ("pqc-gcm-handshake", "pqc", GCM, 0, 88, []),
    ("hybrid-cm-handshake", "hybrid", CM, 32, 60, []),
    ("pqc-cm-handshake", "pqc", CM, 0, 60, []),
    ("hybrid-gcm-rekey-qkd-kem", "hybrid", GCM, 32, 88, [(32, True)]),
    ("hybrid-gcm-rekey-3", "hybrid", GCM, 32, 88, [(32, False), (32, True), (64, True)]),
    ("hybrid-cm-rekey-2-qkd64", "hybrid", CM, 64, 60, [(32, True), (32, False)]),
    ("pqc-gcm-rekey-kem-2", "pqc", GCM, 0, 88, [(0, True), (0, True)]),
    ("pqc-cm-rekey-hash-only", "pqc", CM, 0, 60, [(0, False), (0, True)]),
    ("hybrid-gcm-exporter-32", "hybrid", GCM, 32, 32, [(32, True)]),
    ("hybrid-gcm-two-key-ids", "hybrid", GCM, 16, 88, [(16, True)]),
    # The framing case of docs/key-schedule.md §3: a 64-byte QKD key with no KEM
    # secret, and a 32-byte QKD key whose 32-byte KEM secret continues the same
    # bytes, give different epoch secrets (they did not in version 1).
    ("framing-qkd64", "hybrid", GCM, 32, 88, [(64, False)]),
    ("framing-qkd32-kem32", "hybrid", GCM, 32, 88, [(32, True)]),
]


def material(label: str, length: int) -> bytes:
    """Deterministic pseudo-random test input: SHA-384 chained until long enough."""
    out = b""
    block = label.encode()
    while len(out) < length:
        block = hashlib.sha384(block).digest()
        out += block
    return out[:length]


def key_ids(name: str, epoch: int, count: int) -> list[str]:
    """Deterministic key_IDs in the 8-4-4-4-12 form of ETSI GS QKD 014 (lowercase)."""
    ids = []
    for i in range(count):
        h = material(f"{name} key_ID {epoch} {i}", 16).hex()
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids


def step_inputs(name: str, n: int, qkd_len: int, kem: bool) -> tuple[bytes, bytes, list[str]]:
    """Fresh rekey inputs; the two framing cases share their bytes on purpose."""
    if name.startswith("framing-"):
        both = material("framing K_qkd ‖ K_kem", 64)
        if qkd_len == 64:
            return both, b"", key_ids("framing", n, 1)
        return both[:32], both[32:], key_ids("framing", n, 1)
    k_qkd = material(f"{name} K_qkd {n}", qkd_len) if qkd_len else b""
    k_kem = material(f"{name} K_kem {n}", 32) if kem else b""
    count = 2 if name.endswith("two-key-ids") else 1
    return k_qkd, k_kem, key_ids(name, n, count) if k_qkd else []


def outputs(keys: EpochKeys) -> dict[str, Any]:
    return {
        "secret": keys.secret.hex(),
        "c2s_key": keys.caller_to_callee.key.hex(),
        "c2s_salt": keys.caller_to_callee.salt.hex(),
        "s2c_key": keys.callee_to_caller.key.hex(),
        "s2c_salt": keys.callee_to_caller.salt.hex(),
        "caller_finished": keys.caller_finished.hex(),
        "callee_finished": keys.callee_finished.hex(),
        "caller_qkd_check": keys.caller_qkd_check.hex(),
        "callee_qkd_check": keys.callee_qkd_check.hex(),
        "transcript_check": keys.transcript_check.hex(),
    }


def build() -> dict[str, Any]:
    cases = []
    for name, policy, profile, qkd_len, dtls_len, steps in CASES:
        # The framing cases share everything but the framing of their one rekey.
        base = "framing" if name.startswith("framing-") else name
        th = material(f"{base} TH_0", 48)
        k_qkd = material(f"{base} K_qkd 0", qkd_len) if qkd_len else b""
        ids = key_ids(base, 0, 2 if name.endswith("two-key-ids") else 1) if k_qkd else []
        k_kem = material(f"{base} K_kem 0", 32)
        k_dtls = material(f"{base} K_dtls", dtls_len)
        sas_nonce = material(f"{base} R", 32)
        schedule = KeySchedule(profile, th, k_qkd, k_kem, k_dtls, qkd_key_ids=ids)
        assert schedule.handshake_secret is not None
        handshake_secret = schedule.handshake_secret.hex()
        epochs = [
            {
                "epoch": 0,
                "inputs": {
                    "transcript_hash": th.hex(),
                    "k_qkd": k_qkd.hex(),
                    "qkd_key_ids": ids,
                    "k_kem": k_kem.hex(),
                    "k_dtls": k_dtls.hex(),
                    "sas_nonce": sas_nonce.hex(),
                },
                "outputs": {
                    "handshake_secret": handshake_secret,
                    "sas_commit": sas_commitment(sas_nonce).hex(),
                    "sas": schedule.sas(sas_nonce),
                    **outputs(schedule.current),
                },
            }
        ]
        for n, (step_qkd, step_kem) in enumerate(steps, start=1):
            th = material(f"{base} TH_{n}", 48)
            k_qkd, k_kem, ids = step_inputs(name, n, step_qkd, step_kem)
            keys = schedule.ratchet(th, k_qkd, k_kem, qkd_key_ids=ids)
            epochs.append(
                {
                    "epoch": n,
                    "inputs": {
                        "transcript_hash": th.hex(),
                        "k_qkd": k_qkd.hex(),
                        "qkd_key_ids": ids,
                        "k_kem": k_kem.hex(),
                    },
                    "outputs": outputs(keys),
                }
            )
        cases.append({"name": name, "policy": policy, "profile": profile.value, "epochs": epochs})
    return {
        "source": (
            "generated by scripts/gen_key_schedule_vectors.py (qcall.handshake.keyschedule); "
            "cross-checked by tests/test_keyschedule.py against an independent hashlib/hmac "
            "implementation written from docs/key-schedule.md"
        ),
        "spec": "docs/key-schedule.md",
        "version": 2,
        "hash": "SHA-384",
        "encoding": "all byte strings in lowercase hex; sas is text; qkd_key_ids are text",
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = json.dumps(build(), indent=1) + "\n"
    if args.check:
        if args.output.read_text() != text:
            print(f"{args.output} is out of date", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {len(CASES)} cases to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
