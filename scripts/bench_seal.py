#!/usr/bin/env python3
"""Quantum Cloud Seal benchmark: seals, log additions, proofs (docs/performance.md).

Measures, in one run on this machine:

1. seals signed per second (statement + ML-DSA-65 signature) and verified per second
   (a whole offline verification of a logged bundle: signature, certificate against the
   authority and its CRL, log receipt);
2. log additions per second, each with its latency p50/p99:
   in process, one transaction per entry and batched (256 per transaction), and over
   HTTPS: sequential ``add-entry``, concurrent ``add-entry`` (group commit) and
   ``add-entries`` batches — against **plain SQLite inserts of the same rows** into the
   same schema with the same settings (WAL, ``synchronous=FULL``), measured in the same
   run, one transaction per row and 256 rows per transaction;
3. inclusion proofs at 10**3, 10**5 and 10**6 entries: size, generation and verification
   time (the tree is built in memory from synthetic leaf hashes, level by level).

Usage: ``python scripts/bench_seal.py [--entries N] [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qcall import pqc  # noqa: E402
from qcall.identity import Identity  # noqa: E402
from qcall.org import Authority, OrgTrust  # noqa: E402
from qcall.qkd.pki import create_pki  # noqa: E402
from qcall.seal.bundle import Record, SealBundle  # noqa: E402
from qcall.seal.log import Submission, TransparencyLog  # noqa: E402
from qcall.seal.logclient import LogClient, client_tls_context  # noqa: E402
from qcall.seal.logserver import LogServer, server_tls_context  # noqa: E402
from qcall.seal.logstore import _SCHEMA  # noqa: E402
from qcall.seal.merkle import MerkleTree, leaf_hash, verify_inclusion  # noqa: E402
from qcall.seal.service import Signer  # noqa: E402
from qcall.seal.statement import Kind, Statement  # noqa: E402
from qcall.seal.verify import verify_bundle  # noqa: E402


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


class Bench:
    def __init__(self, root: Path, entries: int) -> None:
        self.root = root
        self.n = entries
        self.org = Authority.create(root / "ca", "Bench Org")
        identity = Identity.generate("alice")
        member = self.org.issue("alice", identity.public_key)
        self.signer = Signer(identity, member, self.org.certificate)
        self.trust = OrgTrust(root / "verifier")
        self.trust.trust(pqc.x509_pem(self.org.certificate))
        self.trust.update_crl((self.org.directory / "crl.pem").read_bytes())
        self.counter = 0
        self.results: dict[str, Any] = {}

    def statement(self) -> Statement:
        self.counter += 1
        return Statement(
            Kind.SEAL,
            hashlib.sha384(self.counter.to_bytes(8, "big")).digest(),
            f"doc-{self.counter}.pdf",
            int(time.time() * 1000),
            "approved",
            self.signer.chain_ids,
        )

    def submissions(self, n: int) -> list[Submission]:
        return [self.signer.submission(self.signer.sign(self.statement())) for _ in range(n)]

    def new_log(self, name: str) -> TransparencyLog:
        log = TransparencyLog.create(self.root / name, name)
        assert log.trust is not None
        log.trust.trust(pqc.x509_pem(self.org.certificate))
        log.trust.update_crl((self.org.directory / "crl.pem").read_bytes())
        return log

    # 1 -----------------------------------------------------------------------------------

    def seals(self) -> None:
        n = max(50, self.n // 10)
        sign = timed(lambda: self.signer.sign(self.statement()), n)
        log = self.new_log("verify-log")
        sub = self.submissions(1)[0]
        (res,) = log.add([sub])
        bundle = SealBundle(
            Record(sub.signed, log.receipt(res.index, res.timestamp)), (), sub.chain
        )
        logs = {log.log_id: log.log_key}
        assert verify_bundle(bundle, self.trust, logs).ok
        verify = timed(lambda: verify_bundle(bundle, self.trust, logs), n)
        fresh = [OrgTrust(self.root / "verifier") for _ in range(n)]  # nothing cached
        cold = timed(lambda: verify_bundle(bundle, fresh.pop(), logs), n)
        log.close()
        self.results["seal_sign_per_s"] = 1 / statistics.median(sign)
        self.results["seal_verify_per_s"] = 1 / statistics.median(verify)
        self.results["seal_sign_ms"] = statistics.median(sign) * 1000
        self.results["seal_verify_ms"] = statistics.median(verify) * 1000
        self.results["seal_verify_cold_per_s"] = 1 / statistics.median(cold)
        self.results["seal_verify_cold_ms"] = statistics.median(cold) * 1000

    # 2 -----------------------------------------------------------------------------------

    def sqlite_baseline(
        self, rows: list[tuple[Any, ...]], per_tx: int
    ) -> tuple[float, list[float]]:
        db = sqlite3.connect(self.root / f"plain-{per_tx}.db", isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.executescript(_SCHEMA)
        lat = []
        t0 = time.perf_counter()
        for i in range(0, len(rows), per_tx):
            t = time.perf_counter()
            db.execute("BEGIN")
            db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", rows[i : i + per_tx])
            db.execute("COMMIT")
            lat.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        db.close()
        return len(rows) / total, lat

    def log_in_process(self) -> None:
        n = self.n
        subs = self.submissions(n)
        log = self.new_log("log-single")
        lat = []
        t0 = time.perf_counter()
        for sub in subs:
            t = time.perf_counter()
            log.add([sub])
            lat.append(time.perf_counter() - t)
        single = n / (time.perf_counter() - t0)
        self.record("log_single", single, lat)
        rows = [
            (i, r.leaf, r.leaf_hash, r.statement_digest, r.signer, r.timestamp, b"".join(r.chain))
            for i, r in enumerate(log.store.entries(0, n))
        ]
        log.close()
        more = self.submissions(n)
        log = self.new_log("log-batched")
        lat = []
        t0 = time.perf_counter()
        for i in range(0, n, 256):
            t = time.perf_counter()
            log.add(more[i : i + 256])
            lat.append(time.perf_counter() - t)
        self.record("log_batched_256", n / (time.perf_counter() - t0), lat)
        log.close()
        # The same, admission (signature and certificate checks) excluded: the tree,
        # the head signature and the storage alone.
        more = self.submissions(n)
        log = self.new_log("log-storage")
        lat = []
        t0 = time.perf_counter()
        for i in range(0, n, 256):
            t = time.perf_counter()
            batch = log.prepare(more[i : i + 256], log.now_ms())
            log.write(batch)
            log.commit(batch)
            lat.append(time.perf_counter() - t)
        self.record("log_storage_256", n / (time.perf_counter() - t0), lat)
        log.close()
        rate, lat = self.sqlite_baseline(rows, 1)
        self.record("sqlite_single", rate, lat)
        rate, lat = self.sqlite_baseline(rows, 256)
        self.record("sqlite_batched_256", rate, lat)

    def record(self, name: str, rate: float, latencies: list[float]) -> None:
        self.results[f"{name}_per_s"] = rate
        self.results[f"{name}_p50_ms"] = statistics.median(latencies) * 1000
        self.results[f"{name}_p99_ms"] = pct(latencies, 0.99) * 1000

    async def log_https(self) -> None:
        n = self.n
        log = self.new_log("log-https")
        tls = create_pki(self.root / "tls", ["seal-log"], [])
        server_ctx = server_tls_context(
            str(tls.kmes["seal-log"].cert), str(tls.kmes["seal-log"].key)
        )
        client_ctx = client_tls_context(str(tls.ca_cert))
        async with LogServer(log, "127.0.0.1", 0, server_ctx) as server:
            async with LogClient(server.url, log.log_key, client_ctx) as client:
                # sequential, one request per entry
                subs = self.submissions(n // 4)
                lat = []
                t0 = time.perf_counter()
                for sub in subs:
                    t = time.perf_counter()
                    await client.add(sub)
                    lat.append(time.perf_counter() - t)
                self.record("https_sequential", len(subs) / (time.perf_counter() - t0), lat)
                # 64 concurrent clients, one entry per request: group commit
                subs = self.submissions(n)
                before = server.batches
                lat = []

                async def one(sub: Submission) -> None:
                    t = time.perf_counter()
                    await client.add(sub)
                    lat.append(time.perf_counter() - t)

                sem = asyncio.Semaphore(64)

                async def limited(sub: Submission) -> None:
                    async with sem:
                        await one(sub)

                t0 = time.perf_counter()
                await asyncio.gather(*(limited(s) for s in subs))
                self.record("https_concurrent64", n / (time.perf_counter() - t0), lat)
                self.results["https_concurrent64_entries_per_tx"] = n / (server.batches - before)
                # add-entries, 256 per request
                subs = self.submissions(n)
                lat = []
                t0 = time.perf_counter()
                for i in range(0, n, 256):
                    t = time.perf_counter()
                    results = await client.add_many(subs[i : i + 256])
                    assert not any(isinstance(r, Exception) for r in results)
                    lat.append(time.perf_counter() - t)
                self.record("https_batched_256", n / (time.perf_counter() - t0), lat)
        log.close()

    # 3 -----------------------------------------------------------------------------------

    def proofs(self, sizes: Sequence[int]) -> None:
        rng = random.Random(1)
        out = []
        for size in sizes:
            t = time.perf_counter()
            hashes = [leaf_hash(i.to_bytes(8, "big")) for i in range(size)]
            tree = MerkleTree()
            tree.extend(hashes)
            build = time.perf_counter() - t
            root = tree.root()
            indexes = [rng.randrange(size) for _ in range(200)]
            gen, ver, lengths = [], [], []
            for i in indexes:
                t = time.perf_counter()
                proof = tree.inclusion_proof(i)
                gen.append(time.perf_counter() - t)
                lengths.append(len(proof))
                leaf = hashes[i]
                t = time.perf_counter()
                verify_inclusion(leaf, i, size, proof, root)
                ver.append(time.perf_counter() - t)
            out.append(
                {
                    "entries": size,
                    "build_s": build,
                    "proof_hashes_max": max(lengths),
                    "proof_bytes_max": 32 * max(lengths),
                    "generate_us": statistics.median(gen) * 1e6,
                    "verify_us": statistics.median(ver) * 1e6,
                    "verify_p99_us": pct(ver, 0.99) * 1e6,
                }
            )
            del tree, hashes
        self.results["proofs"] = out


def report(r: dict[str, Any]) -> None:
    print("Quantum Cloud Seal benchmark (medians; p50/p99 per request or transaction)\n")
    print(f"seals signed    {r['seal_sign_per_s']:8.0f} /s   ({r['seal_sign_ms']:.2f} ms each)")
    print(
        f"seals verified  {r['seal_verify_per_s']:8.0f} /s   ({r['seal_verify_ms']:.2f} ms each,"
        " offline: signature, certificate + CRL, receipt; same signer again)"
    )
    print(
        f"  cold          {r['seal_verify_cold_per_s']:8.0f} /s   "
        f"({r['seal_verify_cold_ms']:.2f} ms each, nothing cached: certificate signature too)\n"
    )
    rows = [
        ("log, in process, 1 entry/transaction", "log_single"),
        ("plain SQLite, 1 row/transaction", "sqlite_single"),
        ("log, in process, 256 entries/transaction", "log_batched_256"),
        ("log, 256/transaction, admission excluded", "log_storage_256"),
        ("plain SQLite, 256 rows/transaction", "sqlite_batched_256"),
        ("log over HTTPS, sequential add-entry", "https_sequential"),
        ("log over HTTPS, 64 concurrent add-entry", "https_concurrent64"),
        ("log over HTTPS, add-entries x256", "https_batched_256"),
    ]
    print(f"{'additions':<44}{'per s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for label, key in rows:
        print(
            f"{label:<44}{r[key + '_per_s']:9.0f}{r[key + '_p50_ms']:9.2f}{r[key + '_p99_ms']:9.2f}"
        )
    print(
        f"\nlog / plain SQLite: {r['log_single_per_s'] / r['sqlite_single_per_s']:.2f} "
        f"(1 per transaction), {r['log_batched_256_per_s'] / r['sqlite_batched_256_per_s']:.2f} "
        f"(256 per transaction), "
        f"{r['log_storage_256_per_s'] / r['sqlite_batched_256_per_s']:.2f} (admission excluded); "
        f"group commit: "
        f"{r['https_concurrent64_entries_per_tx']:.1f} entries per transaction\n"
    )
    print(
        f"{'inclusion proofs':<18}{'build s':>9}{'hashes':>8}{'bytes':>7}{'gen µs':>9}"
        f"{'verify µs':>11}{'p99 µs':>9}"
    )
    for p in r["proofs"]:
        print(
            f"{p['entries']:<18,}{p['build_s']:9.2f}{p['proof_hashes_max']:8}"
            f"{p['proof_bytes_max']:7}{p['generate_us']:9.1f}{p['verify_us']:11.1f}"
            f"{p['verify_p99_us']:9.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=2048, help="additions per mode (2048)")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    n = 256 if args.quick else args.entries
    sizes = [1000, 10_000] if args.quick else [1000, 100_000, 1_000_000]
    with tempfile.TemporaryDirectory(prefix="qcall-bench-seal-") as tmp:
        bench = Bench(Path(tmp), n)
        bench.seals()
        bench.log_in_process()
        asyncio.run(bench.log_https())
        bench.proofs(sizes)
    if args.json:
        print(json.dumps(bench.results, indent=2))
    else:
        report(bench.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
