#!/usr/bin/env python3
"""Generate ``tests/vectors/messaging_kdf.json`` and ``messaging_formats.json``.

Every input is deterministic: byte strings are SHA-384 chains of a label, ML-KEM and
ML-DSA keys come from seeds (FIPS 203 §7.1, FIPS 204 §6.1), and ML-KEM
encapsulations use ``ML-KEM.Encaps_internal(ek, m)`` with a listed ``m``, computed by
the independent pure-Python ``kyber-py`` (``cryptography`` cannot take ``m``; it
decapsulates the same ciphertexts to the same secrets, which this script checks).
The sessions are driven through qcall's real ``initiate``/``respond``/``Session``;
their intermediate keys are recorded as the implementation computes them.
ML-DSA signatures are randomised (hedged), so the files hold the signed bytes,
never a signature; everything regenerates byte for byte:
``python scripts/gen_messaging_vectors.py --check``.
``tests/test_messaging_vectors.py`` checks the files against the implementation and
against an independent re-implementation written from ``docs/messaging.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kyber_py.ml_kem import ML_KEM_768

from qcall import pqc
from qcall.messaging import group as group_mod, ratchet, session as session_mod
from qcall.messaging.content import Content, ContentKind, ReceiptStatus, SenderKeyBody
from qcall.messaging.files import FileEncryptor, FileOffer
from qcall.messaging.group import GroupAction, GroupChange, GroupMember, GroupState, SenderChain
from qcall.messaging.keyschedule import chain_step, expand_label, store_key
from qcall.messaging.messages import PrekeyMessage, QKDRef, RatchetMessage, identity_hash
from qcall.messaging.prekeys import PrekeyBundle, PrekeyKind, make_prekey
from qcall.messaging.ratchet import QKDMaterial, RatchetLimits, Session
from qcall.messaging.session import LocalIdentity, Responder, initiate, respond
from qcall.messaging.wire import framed

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"
KDF_FILE = VECTORS / "messaging_kdf.json"
FORMATS_FILE = VECTORS / "messaging_formats.json"

PYCA = pqc.get_backend("cryptography")
KEM = pqc.KEM.ML_KEM_768
DSA = pqc.SignatureScheme.ML_DSA_65
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NOW_MS = int(NOW * 1000)


def material(label: str, length: int) -> bytes:
    """Deterministic test input: SHA-384 chained from ``label`` until long enough."""
    out, block = b"", label.encode()
    while len(out) < length:
        block = hashlib.sha384(block).digest()
        out += block
    return out[:length]


class Stream:
    """Deterministic "randomness": ``material(f"{label} {n}")`` for the n-th request."""

    def __init__(self, label: str) -> None:
        self.label, self.n = label, 0

    def __call__(self, length: int) -> bytes:
        self.n += 1
        return material(f"{self.label} {self.n}", length)


class VectorBackend:
    """pyca for keys and decapsulation; kyber-py for encapsulation with a known ``m``."""

    name = "vectors"

    def __init__(self, label: str) -> None:
        self.m = Stream(label + " m")
        self.encapsulations: list[dict[str, str]] = []

    def kem_generate(self, algorithm: pqc.KEM) -> pqc.KEMPrivateKey:
        raise AssertionError("vectors make every key from a seed")

    def kem_from_seed(self, algorithm: pqc.KEM, seed: bytes) -> pqc.KEMPrivateKey:
        return PYCA.kem_from_seed(algorithm, seed)

    def kem_encapsulate(self, algorithm: pqc.KEM, public_key: bytes) -> tuple[bytes, bytes]:
        m = self.m(32)
        shared, ct = ML_KEM_768._encaps_internal(public_key, m)
        self.encapsulations.append(
            {"m": m.hex(), "ciphertext": ct.hex(), "shared_secret": shared.hex()}
        )
        return shared, ct

    def signing_generate(self, algorithm: pqc.SignatureScheme) -> pqc.SigningKey:
        raise AssertionError("vectors make every key from a seed")

    def signing_from_seed(self, algorithm: pqc.SignatureScheme, seed: bytes) -> pqc.SigningKey:
        return PYCA.signing_from_seed(algorithm, seed)

    def verify(self, *args: Any, **kwargs: Any) -> bool:
        return PYCA.verify(*args, **kwargs)


@contextmanager
def recording() -> Iterator[list[tuple[str, Any]]]:
    """Record what the ratchet derives: epoch secrets, generation chains, chain steps."""
    log: list[tuple[str, Any]] = []
    saved = {}
    targets = [
        (ratchet, "epoch_secrets"),
        (ratchet, "generation_chain"),
        (ratchet, "chain_step"),
        (session_mod, "epoch_secrets"),
        (session_mod, "root_key_0"),
    ]
    for module, name in targets:
        original = getattr(module, name)
        saved[(module, name)] = original

        def wrapper(*args: Any, _o: Callable[..., Any] = original, _n: str = name) -> Any:
            result = _o(*args)
            log.append((_n, (args, result)))
            return result

        setattr(module, name, wrapper)
    try:
        yield log
    finally:
        for (module, name), original in saved.items():
            setattr(module, name, original)


def identity(name: str) -> LocalIdentity:
    return LocalIdentity(name, PYCA.signing_from_seed(DSA, material(f"{name} identity seed", 32)))


def qkd(label: str, sae: str, size: int = 32) -> QKDMaterial:
    key_id = str(uuid.UUID(bytes=material(label + " key_ID", 16), version=4))
    return QKDMaterial(QKDRef(sae, key_id, size), material(label + " key", size))


def ref_json(ref: QKDRef | None, keys: dict[str, bytes]) -> dict[str, Any] | None:
    if ref is None:
        return None
    return {
        "sae_id": ref.sae_id,
        "key_id": ref.key_id,
        "size": ref.size,
        "key": keys[ref.key_id].hex(),
        "encoding": ref.serialize().hex(),
    }


def text(label: str, body: str) -> Content:
    return Content(ContentKind.TEXT, material(label + " id", 16), NOW_MS, text=body)


def _fixed(seed: bytes) -> Callable[[int], bytes]:
    """A random source that always gives ``seed`` (one prekey's seed)."""

    def random(n: int) -> bytes:
        del n
        return seed

    return random


# --- sessions ---------------------------------------------------------------------------

# (case, mode, one-time prekey?, script of (sender, qkd: None / "qkd" at this message)
#  [, full_every])
SessionCase = (
    tuple[str, bool, bool, Sequence[tuple[str, str | None]]]
    | tuple[str, bool, bool, Sequence[tuple[str, str | None]], int]
)
SESSIONS: list[SessionCase] = [
    (
        "hybrid",
        True,
        True,
        [
            ("alice", None),
            ("alice", None),
            ("bob", None),
            ("bob", "qkd"),
            ("bob", None),
            ("alice", "qkd"),
            ("alice", "qkd"),
            ("alice", None),
            ("bob", None),
            ("alice", None),
        ],
    ),
    (
        "pqc",
        False,
        False,
        [("alice", None), ("bob", None), ("bob", None), ("alice", None), ("bob", None)],
    ),
    (  # short messages (type 5, §7.4): every message but the first of a chain
        "short",
        True,
        False,
        [
            ("alice", None),
            ("bob", None),
            ("bob", None),
            ("bob", "qkd"),
            ("bob", None),
            ("alice", None),
            ("alice", None),
        ],
        1000,
    ),
]


def session_case(
    case: str,
    hybrid: bool,
    with_opk: bool,
    script: Sequence[tuple[str, str | None]],
    full_every: int = 1,
) -> dict[str, Any]:
    """One session's messages; ``full_every`` > 1 makes short messages (§7.4) too."""
    limits = RatchetLimits(full_every=full_every)
    backend = VectorBackend(case)
    alice, bob = identity("alice"), identity("bob")
    stream = Stream(f"{case} prekey seeds")
    spk, spk_seed = make_prekey(
        bob.signing_key, "bob", PrekeyKind.SIGNED, 1, NOW_MS, backend=PYCA, random=stream
    )
    opk = opk_seed = None
    if with_opk:
        opk, opk_seed = make_prekey(
            bob.signing_key, "bob", PrekeyKind.ONE_TIME, 2, NOW_MS, backend=PYCA, random=stream
        )
    bundle = PrekeyBundle("bob", bob.public_key, spk, (opk,) if opk else ())
    setup_key = qkd(f"{case} set-up", "alice-sae") if hybrid else None
    keys: dict[str, bytes] = {setup_key.ref.key_id: setup_key.key} if setup_key else {}
    sessions: dict[str, Session] = {}
    with recording() as log:
        a = initiate(
            alice,
            "bob",
            bundle,
            now=NOW,
            check_peer=lambda n, k: None,
            qkd=setup_key,
            backend=backend,
            random=Stream(f"{case} alice ratchet"),
            limits=limits,
        )
    sessions["alice"] = a
    (_, (rk0_args, rk0)), (_, (_, epoch1)) = log
    init = PrekeyMessage.parse(a.state.pending_init)
    setup = {
        "alice_identity": alice.public_key.hex(),
        "bob_identity": bob.public_key.hex(),
        "signed_prekey": {"seed": spk_seed.hex(), "record": spk.record.serialize().hex()},
        "one_time_prekey": {"seed": opk_seed.hex(), "record": opk.record.serialize().hex()}
        if opk and opk_seed
        else None,
        "encapsulations": backend.encapsulations[:],
        "qkd": ref_json(init.qkd, keys),
        "fields": {
            "sender": init.sender,
            "recipient": init.recipient,
            "mode": init.mode.value,
            "signed_prekey_id": init.signed_prekey_id,
            "one_time_prekey_id": init.one_time_prekey_id,
            "time_ms": init.time_ms,
        },
        "signed_part": init.signed_part().hex(),
        "th_init": rk0_args[0].hex(),
        "root_key_0": rk0.hex(),
        "session_id": a.session_id.hex(),
        "epoch_1": {
            "ratchet_seed": material(f"{case} alice ratchet 1", 64).hex(),
            "root_key": epoch1.root_key.hex(),
            "chain_key": epoch1.chain_key.hex(),
            "generation_seed": epoch1.generation_seed.hex(),
        },
    }
    backend.encapsulations.clear()
    messages = []
    for number, (sender, with_qkd) in enumerate(script):
        receiver = "bob" if sender == "alice" else "alice"
        material_ = qkd(f"{case} message {number}", f"{sender}-sae") if with_qkd else None
        if material_:
            keys[material_.ref.key_id] = material_.key
        content = text(f"{case} {number}", f"{sender} #{number} ✓")
        with recording() as log:
            wire = sessions[sender].encrypt(content.padded(), NOW, material_)
        inner = PrekeyMessage.parse(wire).inner if wire[1] == 1 else wire
        message = RatchetMessage.parse(inner)
        derived: dict[str, str] = {}
        for name, (args, result) in log:
            if name == "epoch_secrets":
                derived |= {
                    "root_key": result.root_key.hex(),
                    "epoch_chain_key": result.chain_key.hex(),
                    "generation_seed": result.generation_seed.hex(),
                }
            elif name == "generation_chain":
                derived["generation_chain_key"] = result.hex()
            else:
                mk, next_key = result
                derived |= {
                    "chain_key": args[0].hex(),
                    "message_key": mk.key.hex(),
                    "nonce": mk.nonce.hex(),
                    "next_chain_key": next_key.hex(),
                }
        entry = {
            "sender": sender,
            "epoch": message.epoch,
            "generation": message.generation,
            "index": message.index,
            "prev_generation": message.prev_generation,
            "prev_length": message.prev_length,
            "ratchet_key": message.ratchet_key.hex(),
            "kem_ciphertext": message.kem_ciphertext.hex(),
            "encapsulation": backend.encapsulations[-1] if backend.encapsulations else None,
            "ratchet_seed": None,
            "epoch_qkd": ref_json(message.epoch_qkd, keys),
            "generation_qkd": ref_json(message.generation_qkd, keys),
            "plaintext": content.padded().hex(),
            "derived": derived,
            "header": message.header().hex(),
            "message": inner.hex(),
        }
        if message.compact:
            entry["compact"] = True
        if "root_key" in derived and message.epoch > 1:
            entry["ratchet_seed"] = sessions[sender].state.send_kem_seed.hex()
        backend.encapsulations.clear()
        # The receiver must read it (bob's session is made by the first message).
        if receiver not in sessions:
            pm = PrekeyMessage.parse(wire)
            responder = Responder(
                bob, spk.record, spk_seed, opk.record if opk else None, opk_seed or b""
            )
            sessions["bob"], _ = respond(
                responder,
                pm,
                now=NOW,
                check_peer=lambda n, k: None,
                qkd_key=setup_key.key if setup_key else None,
                backend=backend,
                random=Stream(f"{case} bob ratchet"),
                limits=limits,
            )
        got = sessions[receiver].decrypt(message, NOW, keys)
        assert got == content.padded(), "the vectors must decrypt"
        messages.append(entry)
    return {
        "name": case,
        "mode": "hybrid" if hybrid else "pqc",
        "setup": setup,
        "messages": messages,
    }


# --- the other KDF uses ---------------------------------------------------------------------


def kdf_misc() -> dict[str, Any]:
    labels = [("root", 48, 48), ("message", 0, 44), ("file nonce", 16, 7), ("store key", 0, 32)]
    expand = [
        {
            "secret": material(f"expand {label}", 48).hex(),
            "label": label,
            "context": material(f"context {label}", n).hex(),
            "length": length,
            "output": expand_label(
                material(f"expand {label}", 48),
                label.encode(),
                material(f"context {label}", n),
                length,
            ).hex(),
        }
        for label, n, length in labels
    ]
    chain, ck = [], material("chain start", 48)
    for _ in range(3):
        mk, nxt = chain_step(ck)
        chain.append(
            {
                "chain_key": ck.hex(),
                "message_key": mk.key.hex(),
                "nonce": mk.nonce.hex(),
                "next_chain_key": nxt.hex(),
            }
        )
        ck = nxt
    seed, salt = material("store seed", 32), material("store salt", 32)
    sk, nk = store_key(seed, salt), store_key(seed, salt, b"store names")
    nonce, row = material("store nonce", 12), material("session id", 16)
    sealed = nonce + pqc.AES256GCM(sk).seal(nonce, b"session state bytes", framed(b"sessions", row))
    return {
        "expand_label": expand,
        "chain_steps": chain,
        "store": {
            "identity_seed": seed.hex(),
            "salt": salt.hex(),
            "store_key": sk.hex(),
            "names_key": nk.hex(),
            "tag_bob": hmac.new(nk, b"bob", hashlib.sha256).digest()[:16].hex(),
            "row": {
                "table": "sessions",
                "row": row.hex(),
                "nonce": nonce.hex(),
                "value": b"session state bytes".hex(),
                "sealed": sealed.hex(),
            },
        },
    }


# --- formats ------------------------------------------------------------------------------------


def formats() -> dict[str, Any]:
    bob = identity("bob")
    prekeys = []
    for kind, pid in ((PrekeyKind.SIGNED, 7), (PrekeyKind.ONE_TIME, 8)):
        seed = material(f"format prekey {pid}", 64)
        signed, _ = make_prekey(
            bob.signing_key, "bob", kind, pid, NOW_MS, backend=PYCA, random=_fixed(seed)
        )
        record = signed.record
        prekeys.append(
            {
                "owner": "bob",
                "identity_key": bob.public_key.hex(),
                "kind": int(kind),
                "prekey_id": pid,
                "created_ms": NOW_MS,
                "seed": seed.hex(),
                "public_key": record.public_key.hex(),
                "record": record.serialize().hex(),
                "signed_data": record.signed_data("bob", bob.public_key).hex(),
            }
        )
    refs = [
        QKDRef("alice-sae", "3fa85f64-5717-4562-b3fc-2c963f66afa6", 32),
        QKDRef("KME_Hefei.bob", "0E8FECEB-A0D6-4E4E-B931-A0E1FBE5A80E", 64),
    ]
    offer = FileOffer(
        material("file id", 16),
        "report.pdf",
        2500,
        hashlib.sha256(material("file data", 2500)).digest(),
        material("file key", 32),
        1024,
        "application/pdf",
    )
    data = material("file data", 2500)
    enc = FileEncryptor(offer)
    chunks = [enc.chunk(i, data[i * 1024 : (i + 1) * 1024]).hex() for i in range(offer.chunks)]
    contents = [
        text("content text", "héllo, 世界"),
        Content(
            ContentKind.RECEIPT,
            material("receipt id", 16),
            NOW_MS,
            status=ReceiptStatus.READ,
            receipts=(material("r1", 16), material("r2", 16)),
        ),
        Content(ContentKind.FILE, material("file msg id", 16), NOW_MS, body=offer.serialize()),
        Content(
            ContentKind.SENDER_KEY,
            material("sk id", 16),
            NOW_MS,
            sender_key=SenderKeyBody(
                material("gid", 16), 3, material("sh", 48), material("ck", 48), 5
            ),
        ),
    ]
    return {
        "prekeys": prekeys,
        "qkd_refs": [
            {
                "sae_id": r.sae_id,
                "key_id": r.key_id,
                "size": r.size,
                "encoding": r.serialize().hex(),
            }
            for r in refs
        ]
        + [{"absent": QKDRef.encode(None).hex()}],
        "contents": [
            {"kind": c.kind.name, "encoding": c.serialize().hex(), "padded": c.padded().hex()}
            for c in contents
        ],
        "file": {
            "file_id": offer.file_id.hex(),
            "name": offer.name,
            "size": offer.size,
            "sha256": offer.sha256.hex(),
            "key": offer.key.hex(),
            "chunk_size": offer.chunk_size,
            "media_type": offer.media_type,
            "offer": offer.serialize().hex(),
            "data": data.hex(),
            "file_key": expand_label(offer.key, b"file key", offer.file_id, 32).hex(),
            "nonce_prefix": expand_label(offer.key, b"file nonce", offer.file_id, 7).hex(),
            "chunks": chunks,
        },
        "group": group_vectors(),
    }


class _Unsigned:
    """A signer for the vectors' group message: signatures are not part of the vectors."""

    algorithm = DSA

    def __init__(self, key: pqc.SigningKey) -> None:
        self.key = key

    def public_bytes(self) -> bytes:
        return self.key.public_bytes()

    def seed_bytes(self) -> bytes:
        return self.key.seed_bytes()

    def sign(self, data: bytes, context: bytes = b"") -> bytes:
        return b""


def group_vectors() -> dict[str, Any]:
    ids = {n: identity(n) for n in ("alice", "bob", "carol")}
    members = tuple(GroupMember(n, identity_hash(i.public_key)) for n, i in sorted(ids.items()))
    gid = material("group id", 16)
    create = GroupChange(gid, 1, bytes(48), GroupAction.CREATE, "alice", "team", members, NOW_MS)
    state1 = GroupState(gid, "team", 1, members, bytes(48))
    remove = GroupChange(
        gid, 2, state1.state_hash, GroupAction.REMOVE, "bob", "team", members[:2], NOW_MS
    )
    state2 = GroupState(gid, "team", 2, members[:2], state1.state_hash)
    chain = SenderChain(material("group chain", 48))
    sender = LocalIdentity("alice", _Unsigned(ids["alice"].signing_key))  # type: ignore[arg-type]
    messages = []
    for i in range(2):
        content = text(f"group {i}", f"to the team #{i}")
        ck = chain.chain_key
        wire = group_mod.encrypt_group(state2, sender, chain, content.padded())
        message = group_mod.GroupMessage.parse(wire)
        messages.append(
            {
                "index": i,
                "chain_key": ck.hex(),
                "plaintext": content.padded().hex(),
                "header": message.header().hex(),
                "ciphertext": message.ciphertext.hex(),
                "signed_data": message.signed_data().hex(),
            }
        )
    return {
        "group_id": gid.hex(),
        "members": [
            {
                "name": m.name,
                "identity_key": ids[m.name].public_key.hex(),
                "identity_hash": m.identity_hash.hex(),
            }
            for m in members
        ],
        "changes": [
            {
                "action": c.action.name,
                "epoch": c.epoch,
                "author": c.author,
                "name": c.name,
                "members": [m.name for m in c.members],
                "prev_hash": c.prev_hash.hex(),
                "time_ms": c.time_ms,
                "signed_part": c.signed_part().hex(),
                "signed_data": c.signed_data().hex(),
            }
            for c in (create, remove)
        ],
        "states": [
            {
                "epoch": s.epoch,
                "members": s.names,
                "prev_hash": s.prev_hash.hex(),
                "state_hash": s.state_hash.hex(),
            }
            for s in (state1, state2)
        ],
        "messages": {"epoch": 2, "sender": "alice", "list": messages},
    }


def build() -> dict[Path, dict[str, Any]]:
    source = (
        "generated by scripts/gen_messaging_vectors.py from qcall.messaging (ML-KEM "
        "encapsulations by kyber-py with the listed m); cross-checked by "
        "tests/test_messaging_vectors.py against a hashlib/hmac/AESGCM implementation "
        "written from docs/messaging.md"
    )
    common = {
        "source": source,
        "spec": "docs/messaging.md",
        "encoding": "lowercase hex; ML-DSA signatures are hedged: signed_data instead",
    }
    return {
        KDF_FILE: {**common, **kdf_misc(), "sessions": [session_case(*c) for c in SESSIONS]},
        FORMATS_FILE: {**common, **formats()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    status = 0
    for path, content in build().items():
        text_ = json.dumps(content, indent=1, ensure_ascii=False) + "\n"
        if args.check:
            if not path.exists() or path.read_text() != text_:
                print(f"{path} is out of date", file=sys.stderr)
                status = 1
            else:
                print(f"{path} is up to date")
        else:
            path.write_text(text_)
            print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
