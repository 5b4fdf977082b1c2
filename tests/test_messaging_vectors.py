"""Messaging vectors: an independent re-implementation of docs/messaging.md, and the code.

The first part uses only hashlib, hmac and cryptography's AESGCM, and was written from
docs/messaging.md (§1 notation, §3 set-up, §4 epochs, §5.4 generations, §6 chains,
§7-§9 formats, §10.2 store keys). ML-KEM secrets are inputs of the vectors; the second
part checks them, and everything else, against qcall's own code.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.utils import load_vectors

KDF = load_vectors("messaging_kdf.json")
FORMATS = load_vectors("messaging_formats.json")
ROOT = Path(__file__).resolve().parent.parent


def h(x: str) -> bytes:
    return bytes.fromhex(x)


# --- §1 notation, from the text ----------------------------------------------------------


def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def var8(x: bytes) -> bytes:
    return u8(len(x)) + x


def var16(x: bytes) -> bytes:
    return u16(len(x)) + x


def var32(x: bytes) -> bytes:
    return u32(len(x)) + x


def framed(*parts: bytes) -> bytes:
    return b"".join(u32(len(p)) + p for p in parts)


def th(domain: str, *parts: bytes) -> bytes:
    return hashlib.sha384(framed(domain.encode(), *parts)).digest()


def extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha384).digest()


def expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha384).digest()
        out += block
        i += 1
    return out[:length]


def label(secret: bytes, name: str, context: bytes, length: int) -> bytes:
    full = b"qmsg1 " + name.encode()
    return expand(secret, u16(length) + var8(full) + var8(context), length)


def chain_step(ck: bytes) -> tuple[bytes, bytes, bytes]:
    m = label(ck, "message", b"", 44)
    return m[:32], m[32:], label(ck, "next", b"", 48)


def qkd_ref(ref: dict[str, Any] | None) -> bytes:
    if ref is None:
        return b"\0\0\0\0"
    return var8(ref["sae_id"].encode()) + var8(ref["key_id"].encode()) + u16(ref["size"])


def pad(content: bytes) -> bytes:
    n = len(content) + 1
    return content + b"\x80" + bytes(-n % 64)


# --- independent checks ------------------------------------------------------------------


@pytest.mark.parametrize("case", KDF["expand_label"], ids=lambda c: c["label"])
def test_expand_label(case: dict[str, Any]) -> None:
    out = label(h(case["secret"]), case["label"], h(case["context"]), case["length"])
    assert out.hex() == case["output"]


def test_chain_steps() -> None:
    for step in KDF["chain_steps"]:
        key, nonce, nxt = chain_step(h(step["chain_key"]))
        assert (key.hex(), nonce.hex(), nxt.hex()) == (
            step["message_key"],
            step["nonce"],
            step["next_chain_key"],
        )


def test_store_keys_and_a_sealed_row() -> None:
    s = KDF["store"]
    prk = extract(h(s["salt"]), framed(h(s["identity_seed"])))
    sk, nk = label(prk, "store key", b"", 32), label(prk, "store names", b"", 32)
    assert (sk.hex(), nk.hex()) == (s["store_key"], s["names_key"])
    assert hmac.new(nk, b"bob", hashlib.sha256).digest()[:16].hex() == s["tag_bob"]
    row = s["row"]
    nonce = h(row["nonce"])
    ad = framed(row["table"].encode(), h(row["row"]))
    assert (nonce + AESGCM(sk).encrypt(nonce, h(row["value"]), ad)).hex() == row["sealed"]


def _signed_part(setup: dict[str, Any]) -> bytes:
    """§7.3 PrekeyMessage⁻ from the set-up fields."""
    f = setup["fields"]
    enc = setup["encapsulations"]
    ct_opk = h(enc[1]["ciphertext"]) if f["one_time_prekey_id"] else b""
    return (
        u8(1)
        + u8(1)
        + var8(f["sender"].encode())
        + var8(f["recipient"].encode())
        + var16(h(setup["alice_identity"]))
        + hashlib.sha256(h(setup["bob_identity"])).digest()
        + u8(1 if f["mode"] == "hybrid" else 2)
        + u32(f["signed_prekey_id"])
        + var16(h(enc[0]["ciphertext"]))
        + u32(f["one_time_prekey_id"])
        + var16(ct_opk)
        + qkd_ref(setup["qkd"])
        + u64(f["time_ms"])
    )


@pytest.mark.parametrize("case", KDF["sessions"], ids=lambda c: c["name"])
def test_session_independently(case: dict[str, Any]) -> None:
    setup = case["setup"]
    signed_part = _signed_part(setup)
    assert signed_part.hex() == setup["signed_part"]
    opk = setup["one_time_prekey"]
    th_init = th(
        "qmsg1 session",
        signed_part,
        h(setup["signed_prekey"]["record"]),
        h(opk["record"]) if opk else b"",
    )
    assert th_init.hex() == setup["th_init"]
    enc = setup["encapsulations"]
    k_qkd = h(setup["qkd"]["key"]) if setup["qkd"] else b""
    ss_opk = h(enc[1]["shared_secret"]) if opk else b""
    rk = extract(th_init, framed(k_qkd, h(enc[0]["shared_secret"]), ss_opk))
    assert rk.hex() == setup["root_key_0"]
    sid = th("qmsg1 session id", th_init)[:16]
    assert sid.hex() == setup["session_id"]

    seeds: dict[int, bytes] = {}  # epoch -> generation seed
    chains: dict[tuple[int, int], tuple[bytes, int]] = {}  # (epoch, gen) -> (CK, next index)
    for m in case["messages"]:
        n, g, i = m["epoch"], m["generation"], m["index"]
        d = m["derived"]
        if n not in seeds:  # §4: a new epoch
            ss = h(m["encapsulation"]["shared_secret"]) if n >= 2 else b""
            assert (m["kem_ciphertext"] == "") == (n == 1)
            if n >= 2:
                assert m["encapsulation"]["ciphertext"] == m["kem_ciphertext"]
            kq = h(m["epoch_qkd"]["key"]) if m["epoch_qkd"] else b""
            eh = th(
                "qmsg1 epoch",
                sid,
                u32(n),
                h(m["ratchet_key"]),
                h(m["kem_ciphertext"]),
                qkd_ref(m["epoch_qkd"]),
            )
            prk = extract(rk, framed(kq, ss))
            rk = label(prk, "root", eh, 48)
            ck0, seeds[n] = label(prk, "chain", eh, 48), label(prk, "generations", eh, 48)
            chains[(n, 0)] = (ck0, 0)
            if n == 1:
                e1 = setup["epoch_1"]
                assert (rk.hex(), ck0.hex(), seeds[1].hex()) == (
                    e1["root_key"],
                    e1["chain_key"],
                    e1["generation_seed"],
                )
            else:
                assert (rk.hex(), ck0.hex(), seeds[n].hex()) == (
                    d["root_key"],
                    d["epoch_chain_key"],
                    d["generation_seed"],
                )
        if (n, g) not in chains:  # §5.4: a new generation
            ref = m["generation_qkd"]
            gh = th("qmsg1 generation", sid, u32(n), u32(g), qkd_ref(ref))
            ck = label(extract(seeds[n], framed(h(ref["key"]))), "chain", gh, 48)
            assert ck.hex() == d["generation_chain_key"]
            chains[(n, g)] = (ck, 0)
        ck, nxt = chains[(n, g)]
        assert nxt == i  # the vectors list every message in sending order
        assert ck.hex() == d["chain_key"]
        key, nonce, ck_next = chain_step(ck)
        assert (key.hex(), nonce.hex()) == (d["message_key"], d["nonce"])
        chains[(n, g)] = (ck_next, i + 1)
        numbers = u32(n) + u32(g) + u32(i) + u32(m["prev_generation"]) + u32(m["prev_length"])
        if m.get("compact"):  # §7.4: a short message, in an epoch the receiver opened
            assert (m["ratchet_key"], m["kem_ciphertext"], m["epoch_qkd"]) == ("", "", None)
            header = u8(1) + u8(5) + sid + numbers + qkd_ref(m["generation_qkd"])
        else:
            header = (
                u8(1)
                + u8(2)
                + sid
                + numbers
                + var16(h(m["ratchet_key"]))
                + var16(h(m["kem_ciphertext"]))
                + qkd_ref(m["epoch_qkd"])
                + qkd_ref(m["generation_qkd"])
            )
        assert header.hex() == m["header"]
        ciphertext = AESGCM(key).encrypt(nonce, h(m["plaintext"]), header)
        assert (header + var32(ciphertext)).hex() == m["message"]


def test_prekey_records_and_signed_data() -> None:
    for p in FORMATS["prekeys"]:
        record = (
            u8(p["kind"])
            + u8(1)
            + u32(p["prekey_id"])
            + u64(p["created_ms"])
            + var16(h(p["public_key"]))
        )
        assert record.hex() == p["record"]
        signed = th("qmsg1 prekey", p["owner"].encode(), h(p["identity_key"]), record)
        assert signed.hex() == p["signed_data"]


def test_qkd_refs_and_contents() -> None:
    for ref in FORMATS["qkd_refs"]:
        if "absent" in ref:
            assert ref["absent"] == qkd_ref(None).hex()
        else:
            assert qkd_ref(ref).hex() == ref["encoding"]
    kinds = {"TEXT": 1, "FILE": 2, "RECEIPT": 3, "GROUP_CHANGE": 4, "SENDER_KEY": 5}
    for c in FORMATS["contents"]:
        encoding = h(c["encoding"])
        assert encoding[0] == kinds[c["kind"]]
        assert pad(encoding).hex() == c["padded"] and len(h(c["padded"])) % 64 == 0


def test_file_offer_and_chunks() -> None:
    f = FORMATS["file"]
    offer = (
        h(f["file_id"])
        + var16(f["name"].encode())
        + u64(f["size"])
        + h(f["sha256"])
        + h(f["key"])
        + u32(f["chunk_size"])
        + var8(f["media_type"].encode())
    )
    assert offer.hex() == f["offer"]
    fk, fid = h(f["key"]), h(f["file_id"])
    k_file, prefix = label(fk, "file key", fid, 32), label(fk, "file nonce", fid, 7)
    assert (k_file.hex(), prefix.hex()) == (f["file_key"], f["nonce_prefix"])
    data, size = h(f["data"]), f["chunk_size"]
    count = max(1, -(-f["size"] // size))
    assert len(f["chunks"]) == count
    for i in range(count):
        final = 1 if i == count - 1 else 0
        head = u8(1) + u8(4) + fid + u32(i) + u8(final)
        sealed = AESGCM(k_file).encrypt(
            prefix + u32(i) + u8(final), data[i * size : (i + 1) * size], head
        )
        assert (head + var32(sealed)).hex() == f["chunks"][i]
    assert hashlib.sha256(data).hexdigest() == f["sha256"]


def test_group_changes_states_and_messages() -> None:
    g = FORMATS["group"]
    gid = h(g["group_id"])
    hashes = {m["name"]: h(m["identity_hash"]) for m in g["members"]}
    for m in g["members"]:
        assert hashlib.sha256(h(m["identity_key"])).digest() == hashes[m["name"]]

    def members(names: list[str]) -> bytes:
        return u16(len(names)) + b"".join(var8(n.encode()) + hashes[n] for n in sorted(names))

    actions = {"CREATE": 1, "ADD": 2, "REMOVE": 3, "LEAVE": 4}
    for c in g["changes"]:
        part = (
            u8(1)
            + gid
            + u32(c["epoch"])
            + h(c["prev_hash"])
            + u8(actions[c["action"]])
            + var8(c["author"].encode())
            + var8(c["name"].encode())
            + members(c["members"])
            + u64(c["time_ms"])
        )
        assert part.hex() == c["signed_part"]
        assert th("qmsg1 group change", part).hex() == c["signed_data"]
    for s in g["states"]:
        digest = th(
            "qmsg1 group state",
            gid,
            u32(s["epoch"]),
            b"team",
            members(s["members"]),
            h(s["prev_hash"]),
        )
        assert digest.hex() == s["state_hash"]
    msgs = g["messages"]
    ck = h(msgs["list"][0]["chain_key"])
    for m in msgs["list"]:
        assert ck.hex() == m["chain_key"]
        key, nonce, ck = chain_step(ck)
        head = (
            u8(1)
            + u8(3)
            + gid
            + u32(msgs["epoch"])
            + var8(msgs["sender"].encode())
            + u32(m["index"])
        )
        assert head.hex() == m["header"]
        sealed = AESGCM(key).encrypt(nonce, h(m["plaintext"]), head)
        assert sealed.hex() == m["ciphertext"]
        assert th("qmsg1 group message", head + var32(sealed)).hex() == m["signed_data"]


# --- the same vectors against qcall's code --------------------------------------------------


def test_ml_kem_secrets_decapsulate_with_cryptography() -> None:
    from qcall import pqc

    backend = pqc.get_backend("cryptography")
    kem = pqc.KEM.ML_KEM_768
    for case in KDF["sessions"]:
        setup = case["setup"]
        prekeys = [setup["signed_prekey"], setup["one_time_prekey"]]
        for prekey, enc in zip(prekeys, setup["encapsulations"], strict=False):
            key = backend.kem_from_seed(kem, h(prekey["seed"]))
            assert key.decapsulate(h(enc["ciphertext"])).hex() == enc["shared_secret"]
        seeds = {1: h(setup["epoch_1"]["ratchet_seed"])}
        for m in case["messages"]:
            if m["ratchet_seed"]:
                seeds[m["epoch"]] = h(m["ratchet_seed"])
            if m["encapsulation"] and m["epoch"] >= 2:
                key = backend.kem_from_seed(kem, seeds[m["epoch"] - 1])
                assert (
                    key.decapsulate(h(m["kem_ciphertext"])).hex()
                    == m["encapsulation"]["shared_secret"]
                )
                assert key.public_bytes().hex() == _ek_of(case, m["epoch"] - 1)


def _ek_of(case: dict[str, Any], epoch: int) -> str:
    key: str = next(m["ratchet_key"] for m in case["messages"] if m["epoch"] == epoch)
    return key


def test_messages_parse_and_serialize_with_the_code() -> None:
    from qcall.messaging.content import Content
    from qcall.messaging.files import FileChunk, FileOffer
    from qcall.messaging.group import GroupMessage
    from qcall.messaging.messages import RatchetMessage
    from qcall.messaging.prekeys import PrekeyRecord
    from qcall.messaging.wire import Reader

    for case in KDF["sessions"]:
        for m in case["messages"]:
            parsed = RatchetMessage.parse(h(m["message"]))
            assert parsed.serialize().hex() == m["message"] and parsed.header().hex() == m["header"]
    for p in FORMATS["prekeys"]:
        assert PrekeyRecord.read(Reader(h(p["record"]), "record")).serialize().hex() == p["record"]
    for c in FORMATS["contents"]:
        assert Content.parse(h(c["padded"])).serialize().hex() == c["encoding"]
    offer = FileOffer.parse(h(FORMATS["file"]["offer"]))
    assert offer.serialize().hex() == FORMATS["file"]["offer"]
    for chunk in FORMATS["file"]["chunks"]:
        assert FileChunk.parse(h(chunk)).serialize().hex() == chunk
    m = FORMATS["group"]["messages"]["list"][0]
    message = GroupMessage.parse(h(m["header"]) + var32(h(m["ciphertext"])) + var16(b""))
    assert message.signed_data().hex() == m["signed_data"]


def test_vector_files_are_up_to_date() -> None:
    """The generator reproduces both files byte for byte (needs kyber-py, a test dependency)."""
    pytest.importorskip("kyber_py.ml_kem", reason="kyber-py is a test dependency")
    spec = importlib.util.spec_from_file_location(
        "gen", ROOT / "scripts" / "gen_messaging_vectors.py"
    )
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for path, content in gen.build().items():
        assert json.loads(path.read_text()) == content, f"{path.name} is out of date"
