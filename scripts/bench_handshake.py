#!/usr/bin/env python3
"""CPU cost of the hybrid handshake: each step, the whole handshake, and the primitives.

Both parties run in this process; no network, no KME (the QKD key is handed over
in memory). Prints medians over ``--runs`` runs and the ratio of the whole
handshake to the sum of the raw primitive costs it must pay, measured in the
same run, interleaved with the handshakes so that both see the same load::

    keygen + encaps + decaps (ML-KEM-768) + 2 × sign + 2 × verify (ML-DSA-65)

Both figures are medians of per-run totals (ML-DSA signing time is heavy-tailed,
so a median of sums is not a sum of medians).

``--backend`` picks the post-quantum backend (:data:`qcall.pqc.BACKENDS`):
``default`` (pyca/cryptography) or ``oqs`` (liboqs, when its shared library is
installed: docs/backends.md). An unavailable backend is an error naming what to
install (exit status 1); nothing but the results goes to stdout, so ``--json``
output stays one JSON object whichever backend runs.

Usage: ``python scripts/bench_handshake.py [--runs 500] [--backend default|oqs] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from qcall import pqc
from qcall.exceptions import QCallError
from qcall.handshake import (
    CalleeHandshake,
    CallerHandshake,
    KeySchedule,
    QKDKey,
    QKDRoute,
    SRTPProfile,
    State,
)

SDP = "v=0\r\na=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"


def median_us(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


#: ``--backend`` choices: ``default`` is what ``qcall`` uses unless told otherwise.
BACKEND_CHOICES = ("default", *pqc.BACKENDS)


def bench(runs: int, policy: str, backend_name: str = "default") -> dict[str, Any]:
    """Run the benchmark on backend ``backend_name`` (see :data:`BACKEND_CHOICES`).

    Raises:
        BackendUnavailableError: the backend cannot be used on this machine.
    """
    backend = pqc.get_backend("auto" if backend_name == "default" else backend_name)
    alice = backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)
    bob = backend.signing_generate(pqc.SignatureScheme.ML_DSA_65)
    pins = {"alice": alice.public_bytes(), "bob": bob.public_bytes()}

    def check_peer(name: str, public_key: bytes) -> None:
        assert pins[name] == public_key

    # --- raw primitives, interleaved with the handshakes below (same load) ------------
    kem_alg = pqc.KEM.ML_KEM_768
    sig_alg = pqc.SignatureScheme.ML_DSA_65
    kem_key = backend.kem_generate(kem_alg)
    ek = kem_key.public_bytes()
    _, ct = backend.kem_encapsulate(kem_alg, ek)
    alice_pk = alice.public_bytes()
    prim_samples: dict[str, list[float]] = {}
    # the primitive cost a handshake must pay: kg + enc + dec + 2 sign + 2 verify
    prim_totals: list[float] = []

    def primitives_once() -> None:
        msg = os.urandom(48)
        sig = b""

        def sign() -> None:
            nonlocal sig
            sig = alice.sign(msg, b"ctx")

        ops: dict[str, Callable[[], object]] = {
            "ML-KEM-768 keygen": lambda: backend.kem_generate(kem_alg),
            "ML-KEM-768 encaps": lambda: backend.kem_encapsulate(kem_alg, ek),
            "ML-KEM-768 decaps": lambda: kem_key.decapsulate(ct),
            "ML-DSA-65 sign": sign,
            "ML-DSA-65 verify": lambda: backend.verify(sig_alg, alice_pk, sig, msg, b"ctx"),
            "key schedule (epoch 0)": lambda: KeySchedule(
                SRTPProfile.AEAD_AES_256_GCM, msg, b"q" * 32, b"k" * 32, b"d" * 88
            ),
        }
        took = {}
        for name, op in ops.items():
            t0 = time.perf_counter()
            op()
            took[name] = (time.perf_counter() - t0) * 1e6
            prim_samples.setdefault(name, []).append(took[name])
        # a second, independent signature and verification (the handshake has two)
        t0 = time.perf_counter()
        sign()
        backend.verify(sig_alg, alice_pk, sig, msg, b"ctx")
        second = (time.perf_counter() - t0) * 1e6
        prim_totals.append(sum(took[k] for k in ops if not k.startswith("key schedule")) + second)

    # --- the handshake, step by step -----------------------------------------------------
    steps: dict[str, list[float]] = {}
    totals: list[float] = []
    route = QKDRoute("KME-Beijing", "SAE-alice", "SAE-bob")
    for i in range(runs):
        primitives_once()
        now = 1_780_000_000.0 + i
        qkd = QKDKey(str(uuid.uuid4()), os.urandom(32)) if policy == "hybrid" else None
        exporter = os.urandom(88)
        timings: dict[str, float] = {}

        def step(name: str, fn: Callable[[], object], timings: dict[str, float] = timings) -> None:
            t0 = time.perf_counter()
            fn()
            timings[name] = time.perf_counter() - t0

        def construct() -> tuple[CallerHandshake, CalleeHandshake]:
            return (
                CallerHandshake(
                    alice, "alice", "bob", check_peer=check_peer, policy=policy,
                    qkd_route=route if qkd else None, backend=backend,
                ),
                CalleeHandshake(bob, "bob", check_peer=check_peer, policy=policy, backend=backend),
            )  # fmt: skip

        t0 = time.perf_counter()
        caller, callee = construct()
        timings["0 both: construct protocol objects"] = time.perf_counter() - t0

        step(
            "1 caller: send_offer (keygen+sign)",
            lambda: caller.send_offer(SDP, now, [qkd] if qkd else []),
        )
        offer = caller.data_to_send()[0]
        step("2 callee: receive offer (verify+encaps)", lambda: callee.receive_data(offer, now))
        callee.events_received()
        if qkd:
            step("3 callee: receive_qkd_keys", lambda: callee.receive_qkd_keys([qkd]))
        step("4 callee: send_answer (sign)", lambda: callee.send_answer(SDP, now))
        answer = callee.data_to_send()[0]
        step("5 caller: receive answer (verify+decaps)", lambda: caller.receive_data(answer, now))
        step("6 caller: exporter → keys + confirm", lambda: caller.receive_dtls_exporter(exporter))
        step("7 callee: exporter → keys + confirm", lambda: callee.receive_dtls_exporter(exporter))
        c1, c2 = caller.data_to_send()[0], callee.data_to_send()[0]
        step("8 callee: verify confirm", lambda: callee.receive_data(c1, now))
        step("9 caller: verify confirm", lambda: caller.receive_data(c2, now))
        assert caller.state is State.ESTABLISHED and callee.state is State.ESTABLISHED
        assert caller.sas == callee.sas
        for name, value in timings.items():
            steps.setdefault(name, []).append(value * 1e6)
        totals.append(sum(timings.values()) * 1e6)

    whole = statistics.median(totals)
    prims = {k: statistics.median(v) for k, v in prim_samples.items()}
    primitive_sum = statistics.median(prim_totals)
    return {
        "runs": runs,
        "policy": policy,
        "backend": backend.name,
        "backend_library": getattr(backend, "library_version", None),  # liboqs release
        "primitives_us": {k: round(v, 1) for k, v in prims.items()},
        "steps_us": {k: round(statistics.median(v), 1) for k, v in sorted(steps.items())},
        "handshake_us": round(whole, 1),
        "primitive_sum_us": round(primitive_sum, 1),
        "ratio_to_primitives": round(whole / primitive_sum, 3),
        "target_us": 2000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--policy", choices=["hybrid", "pqc"], default="hybrid")
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="default",
        help="post-quantum backend (default: pyca/cryptography; oqs needs liboqs installed)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        result = bench(args.runs, args.policy, args.backend)
    except QCallError as exc:
        print(f"bench_handshake: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"qcall handshake benchmark: {args.runs} runs, policy {args.policy}, "
        f"backend {result['backend']}, medians"
    )
    print("primitives:")
    for name, us in result["primitives_us"].items():
        print(f"  {name:40s} {us:9.1f} µs")
    print("handshake steps:")
    for name, us in result["steps_us"].items():
        print(f"  {name:40s} {us:9.1f} µs")
    print(
        f"whole handshake (both parties)             {result['handshake_us']:9.1f} µs"
        f"  (target ≤ {result['target_us']} µs)"
    )
    print(f"primitives (kg+enc+dec+2·sign+2·vfy)       {result['primitive_sum_us']:9.1f} µs")
    print(f"ratio handshake / primitives               {result['ratio_to_primitives']:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
