#!/usr/bin/env python3
"""Benchmark qcall's post-quantum wrapper, identities and contacts store.

Prints medians (µs) for every available backend of :mod:`qcall.pqc`, with the
ratio to a baseline measured in the same run:

* ML-KEM-768 operations: baseline is ``kyber-py`` (pure Python, independent
  implementation), so the ratio shows what the native backend buys.
* ``ContactStore.check_peer`` on a known contact: baseline is a full parse of the
  store (what every call cost before the parsed-file cache).

Usage: ``python scripts/bench_pqc.py [--repeat N] [--contacts N]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qcall import pqc
from qcall.contacts import ContactStore, parse_contacts
from qcall.identity import Identity


def median_us(func: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def row(label: str, value: float, baseline: float | None = None) -> None:
    ratio = f"  ({baseline / value:6.1f}x faster than baseline)" if baseline else ""
    print(f"  {label:<42} {value:10.1f} µs{ratio}")


def bench_backends(repeat: int) -> None:
    from kyber_py.ml_kem import ML_KEM_768

    ek, dk = ML_KEM_768.keygen()
    _, c = ML_KEM_768.encaps(ek)
    base = {
        "keygen": median_us(ML_KEM_768.keygen, max(5, repeat // 20)),
        "encaps": median_us(lambda: ML_KEM_768.encaps(ek), max(5, repeat // 20)),
        "decaps": median_us(lambda: ML_KEM_768.decaps(dk, c), max(5, repeat // 20)),
    }
    print("baseline kyber-py ML-KEM-768:")
    for op, value in base.items():
        row(op, value)
    for name in pqc.available_backends():
        backend = pqc.get_backend(name)
        kem = pqc.KEM.ML_KEM_768
        key = backend.kem_generate(kem)
        _, ct = backend.kem_encapsulate(kem, key.public_bytes())
        print(f"backend {name}:")
        row(
            "ML-KEM-768 keygen",
            median_us(lambda: backend.kem_generate(kem), repeat),
            base["keygen"],
        )
        row(
            "ML-KEM-768 encaps",
            median_us(lambda: backend.kem_encapsulate(kem, key.public_bytes()), repeat),
            base["encaps"],
        )
        row("ML-KEM-768 decaps", median_us(lambda: key.decapsulate(ct), repeat), base["decaps"])
        scheme = pqc.SignatureScheme.ML_DSA_65
        signer = backend.signing_generate(scheme)
        sig = signer.sign(b"transcript")
        pk = signer.public_bytes()
        row("ML-DSA-65 sign", median_us(lambda: signer.sign(b"transcript"), repeat))
        row(
            "ML-DSA-65 verify",
            median_us(lambda: backend.verify(scheme, pk, sig, b"transcript"), repeat),
        )
        row(
            "check_support (start-up self-test)",
            median_us(lambda: pqc.check_support(backend), repeat),
        )


def bench_store(repeat: int, count: int) -> None:
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        Identity.generate("alice").save(home)
        store = ContactStore.in_home(home)
        backend = pqc.get_backend("cryptography")
        keys = [
            backend.signing_generate(pqc.SignatureScheme.ML_DSA_65).public_bytes()
            for _ in range(count)
        ]
        for i, key in enumerate(keys):
            store.pin(f"c{i}", key)
        data = store.path.read_bytes()
        print(f"identity and contacts ({count} contacts):")
        row("Identity.load", median_us(lambda: Identity.load(home), repeat))
        baseline = median_us(lambda: parse_contacts(data), repeat)
        row("baseline: full parse of contacts.json", baseline)
        row(
            "check_peer, known contact",
            median_us(lambda: store.check_peer("c1", keys[1]), repeat),
            baseline,
        )
        counter = iter(range(10**9))
        row(
            "check_peer, first sight (pin, 2 fsyncs)",
            median_us(
                lambda: store.check_peer(f"new{next(counter)}", keys[0]), max(5, repeat // 10)
            ),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--contacts", type=int, default=100)
    args = parser.parse_args()
    bench_backends(args.repeat)
    bench_store(args.repeat, args.contacts)


if __name__ == "__main__":
    main()
