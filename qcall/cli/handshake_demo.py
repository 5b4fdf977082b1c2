"""``qcall demo --handshake-only``: the hybrid handshake between two in-process parties.

Alice sits at the Beijing site, Bob at the Hefei site. Each gets a fresh
ML-DSA-65 identity; a small in-memory stand-in plays the two sites' KMEs
(ETSI GS QKD 014 ``enc_keys`` / ``dec_keys`` with UUID key_IDs). The demo runs
offer → answer → key confirmation and one rekey with a fresh QKD key and a fresh
ML-KEM secret, then prints the negotiated suite, the key IDs, both SAS values and
the timings. ``--json`` prints one JSON object.

There is no DTLS here: both sides receive the same random stand-in for the DTLS
exporter. It shows the key agreement alone, in milliseconds; ``qcall demo``
without ``--handshake-only`` places the real call (:mod:`qcall.cli.demo`).
"""

from __future__ import annotations

import functools
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from qcall.exceptions import IdentityChangedError, KeyNotFoundError

__all__ = ["InMemoryKMEPair", "print_handshake_demo", "run_handshake_demo"]

CALLER_SITE, CALLEE_SITE = "Beijing", "Hefei"


class InMemoryKMEPair:
    """Two sites' KMEs sharing one key store: a stand-in for the real KME layer.

    ``enc_keys`` at the master's site returns fresh ``(key_ID, key)`` pairs;
    ``dec_keys`` at the slave's site returns each key once and forgets it
    (ETSI GS QKD 014 §5.2, §5.3: keys are consumed once).
    """

    def __init__(self, master_kme: str, slave_kme: str) -> None:
        self.master_kme = master_kme
        self.slave_kme = slave_kme
        self._store: dict[str, bytes] = {}

    def enc_keys(self, number: int = 1, size: int = 256) -> list[Any]:
        from qcall.handshake import QKDKey

        keys = [QKDKey(str(uuid.uuid4()), os.urandom(size // 8)) for _ in range(number)]
        for key in keys:
            self._store[key.key_id] = key.key
        return keys

    def dec_keys(self, key_ids: tuple[str, ...]) -> list[Any]:
        from qcall.handshake import QKDKey

        missing = [k for k in key_ids if k not in self._store]
        if missing:
            raise KeyNotFoundError(f"no key with key_ID {missing[0]} (or already consumed)")
        return [QKDKey(k, self._store.pop(k)) for k in key_ids]


def _tofu() -> Callable[[str, bytes], None]:
    """Trust on first use, in memory (the real one is qcall.contacts.ContactStore)."""
    pins: dict[str, bytes] = {}

    def check_peer(name: str, public_key: bytes) -> None:
        if pins.setdefault(name, public_key) != public_key:
            raise IdentityChangedError(f"{name!r} presented a different identity key")

    return check_peer


def _fake_sdp(kind: str) -> str:
    fingerprint = ":".join(f"{b:02X}" for b in os.urandom(32))
    return (
        f"v=0\r\no=- {int.from_bytes(os.urandom(4), 'big')} 2 IN IP4 127.0.0.1\r\n"
        f"s=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
        f"a=setup:{'actpass' if kind == 'offer' else 'active'}\r\n"
        f"a=fingerprint:sha-256 {fingerprint}\r\n"
    )


def run_handshake_demo(policy: str = "hybrid") -> dict[str, Any]:
    """Run the whole demonstration in memory and return its results as plain data.

    Raises:
        QCallError: any failure (it would be a bug: both parties are honest).
    """
    from qcall import pqc
    from qcall.handshake import (
        CalleeHandshake,
        CallerHandshake,
        HandshakeFailed,
        KeyConfirmed,
        KeysDerived,
        QKDKeysNeeded,
        QKDRoute,
        RekeyCompleted,
    )
    from qcall.handshake.protocol import key_fingerprint

    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        timings[name] = round((time.perf_counter() - t0) * 1000, 3)
        return result

    backend = pqc.get_backend()
    alice_id = timed("alice: new ML-DSA-65 identity", lambda: backend.signing_generate(
        pqc.SignatureScheme.ML_DSA_65
    ))  # fmt: skip
    bob_id = timed("bob: new ML-DSA-65 identity", lambda: backend.signing_generate(
        pqc.SignatureScheme.ML_DSA_65
    ))  # fmt: skip
    kmes = InMemoryKMEPair(f"KME-{CALLER_SITE}", f"KME-{CALLEE_SITE}")
    route = QKDRoute(kmes.master_kme, f"alice@{CALLER_SITE.lower()}", f"bob@{CALLEE_SITE.lower()}")
    alice = CallerHandshake(
        alice_id, "alice", "bob", check_peer=_tofu(), policy=policy,
        qkd_route=route if policy == "hybrid" else None, backend=backend,
    )  # fmt: skip
    bob = CalleeHandshake(bob_id, "bob", check_peer=_tofu(), policy=policy, backend=backend)
    events: dict[str, list[Any]] = {"alice": [], "bob": []}

    def pump() -> None:
        """Deliver messages both ways and serve Bob's KME requests until all is quiet."""
        moved = True
        while moved:
            moved = False
            now = time.time()
            for src, dst in ((alice, bob), (bob, alice)):
                for data in src.data_to_send():
                    dst.receive_data(data, now)
                    moved = True
            deliver_events()

    def deliver_events() -> None:
        events["alice"] += alice.events_received()
        for event in bob.events_received():
            events["bob"].append(event)
            if isinstance(event, QKDKeysNeeded):  # Bob's shell asks Hefei's KME: dec_keys
                fetch = functools.partial(kmes.dec_keys, event.key_ids)
                keys = timed(f"bob: dec_keys (epoch {event.epoch})", fetch)
                bob.receive_qkd_keys(keys)
        for name in ("alice", "bob"):
            for event in events[name]:
                if isinstance(event, HandshakeFailed):
                    raise event.error

    t_start = time.perf_counter()
    qkd_keys = timed("alice: enc_keys", lambda: kmes.enc_keys()) if policy == "hybrid" else []
    timed("alice: send_offer", lambda: alice.send_offer(_fake_sdp("offer"), time.time(), qkd_keys))
    timed("bob: receive offer (+ dec_keys)", pump)
    timed("bob: send_answer", lambda: bob.send_answer(_fake_sdp("answer"), time.time()))
    timed("alice: receive answer", pump)
    exporter = os.urandom(88)  # stand-in for RFC 5705 EXTRACTOR-dtls_srtp (no DTLS yet)
    timed("alice: keys from DTLS exporter", lambda: alice.receive_dtls_exporter(exporter))
    timed("bob: keys from DTLS exporter", lambda: bob.receive_dtls_exporter(exporter))
    timed("both: key confirmation", pump)
    timings["handshake total"] = round((time.perf_counter() - t_start) * 1000, 3)

    rekey_keys = kmes.enc_keys() if policy == "hybrid" else []
    t0 = time.perf_counter()
    alice.rekey(time.time(), rekey_keys, fresh_kem=True)
    pump()
    timings["rekey total (fresh QKD key + ML-KEM)"] = round((time.perf_counter() - t0) * 1000, 3)

    def derived(name: str, epoch: int) -> Any:
        return next(e for e in events[name] if isinstance(e, KeysDerived) and e.epoch == epoch)

    a0, b0 = derived("alice", 0), derived("bob", 0)
    secrets = (
        ["QKD", "ML-KEM", "DTLS exporter"] if policy == "hybrid" else ["ML-KEM", "DTLS exporter"]
    )
    a1, b1 = derived("alice", 1), derived("bob", 1)
    return {
        "policy": policy,
        "suite": {
            "kem": alice.kem.algorithm.value,
            "signature": alice_id.algorithm.value,
            "kdf": "HKDF-SHA-384",
            "srtp_profile": a0.profile.value,
            "secrets": secrets,
        },
        "alice": {
            "site": CALLER_SITE,
            "fingerprint": key_fingerprint(alice_id.public_bytes()),
        },
        "bob": {"site": CALLEE_SITE, "fingerprint": key_fingerprint(bob_id.public_bytes())},
        "qkd": {
            "kme": [kmes.master_kme, kmes.slave_kme] if policy == "hybrid" else [],
            "key_ids": list(a0.qkd_key_ids),
            "rekey_key_ids": list(a1.qkd_key_ids),
        },
        "sas": {"alice": alice.sas, "bob": bob.sas, "match": alice.sas == bob.sas},
        "confirmed": {
            name: [e.epoch for e in events[name] if isinstance(e, KeyConfirmed)]
            for name in ("alice", "bob")
        },
        "keys_agree": a0.local_keys == b0.remote_keys and a1.local_keys == b1.remote_keys,
        "key_fingerprints": {
            "epoch0_alice_to_bob": a0.local_keys.fingerprint(),
            "epoch1_alice_to_bob": a1.local_keys.fingerprint(),
        },
        "rekeyed": any(isinstance(e, RekeyCompleted) for e in events["bob"]),
        "timings_ms": timings,
    }


def print_handshake_demo(args: Any) -> int:
    """Run :func:`run_handshake_demo` and print it (``args.json``, ``args.policy``)."""
    result = run_handshake_demo(args.policy)
    if args.json:
        print(json.dumps(result))
        return 0 if result["sas"]["match"] and result["keys_agree"] else 1
    from rich.console import Console
    from rich.table import Table

    console = Console()
    suite = result["suite"]
    console.print(
        f"[bold]qcall demo[/bold]: alice ({CALLER_SITE}) calls bob ({CALLEE_SITE}), "
        f"policy [bold]{result['policy']}[/bold]"
    )
    console.print(
        f"suite: {suite['kem']} + {suite['signature']} + {suite['kdf']} → "
        f"{suite['srtp_profile']}   secrets: {' ‖ '.join(suite['secrets'])}"
    )
    if result["qkd"]["key_ids"]:
        console.print(
            f"QKD: {' ↔ '.join(result['qkd']['kme'])}  key_ID {result['qkd']['key_ids'][0]}"
            f"  (rekey: {result['qkd']['rekey_key_ids'][0]})"
        )
    else:
        console.print("QKD: none (policy pqc, signed into the transcript)")
    console.print(
        f"identities: alice {result['alice']['fingerprint']}  bob {result['bob']['fingerprint']}"
    )
    sas = result["sas"]
    colour = "green" if sas["match"] else "red"
    console.print(
        f"SAS: alice [bold {colour}]{sas['alice']}[/]  bob [bold {colour}]{sas['bob']}[/]"
        f"  ({'equal' if sas['match'] else 'DIFFERENT'}; read it aloud on a real call)"
    )
    console.print(
        f"key confirmation: epochs {result['confirmed']['alice']} confirmed; "
        f"keys agree: {result['keys_agree']}"
    )
    table = Table(title="timings (this process, no network)")
    table.add_column("step")
    table.add_column("ms", justify="right")
    for step, ms in result["timings_ms"].items():
        table.add_row(step, f"{ms:.3f}")
    console.print(table)
    return 0 if sas["match"] and result["keys_agree"] else 1
