"""An independent implementation of the links between signaling instances.

Written from docs/signaling.md, "Direct links between instances" (notation, the
secret, framing, handshake, frames, numbering, relay fast path) alone, with only
hashlib, hmac, json and struct: it imports nothing of ``signaling`` or ``qcall``.
JSON texts are written by hand from the spec's escaping rule (not by
``json.dumps``), so that the text, not Python's defaults, is what is checked.

Sans-I/O: :class:`Dialer` and :class:`Listener` take bytes in and return bytes
to write; a refused input raises :class:`LinkRefusedError` (the spec's causes are the
reference's texts, so only the refusal is compared, not its wording).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from typing import Any

HELLO, WELCOME, AUTH, FRAME, ACK, ERROR = 1, 2, 3, 4, 5, 6
KINDS = {HELLO, WELCOME, AUTH, FRAME, ACK, ERROR}
MAX_BODY = 4_194_304
TAG_LEN = 16
NONCE_LEN = 32
WHITE = b" \t\n\x0b\x0c\r"


class LinkRefusedError(Exception):
    """The input ends the link (an ``ERROR`` frame is written, then it closes)."""


# --- notation -------------------------------------------------------------------------------


def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def L(x: bytes) -> bytes:  # noqa: N802 (the spec's name)
    return u16(len(x)) + x


def mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def secret_of_file(content: bytes) -> bytes:
    """The key: the file's bytes, ASCII white space stripped at both ends, as they are."""
    return content.strip(WHITE)


# --- JSON as the spec writes it ---------------------------------------------------------------

_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def jstr(text: str) -> str:
    """A JSON string, escaped by the spec's rule."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif 0x20 <= code <= 0x7E:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def compact(members: list[tuple[str, str | int]]) -> bytes:
    """A compact JSON object: no white space, members in the given order."""
    parts = [f"{jstr(k)}:{jstr(v) if isinstance(v, str) else int(v)}" for k, v in members]
    return ("{" + ",".join(parts) + "}").encode()


# --- framing ----------------------------------------------------------------------------------


def frame(kind: int, body: bytes) -> bytes:
    return u8(kind) + u32(len(body)) + body


class Reader:
    """Cuts whole frames out of a stream."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        out = []
        while len(self.buffer) >= 5:
            kind, length = struct.unpack(">BI", self.buffer[:5])
            if kind not in KINDS:
                raise LinkRefusedError(f"kind {kind}")
            if length > MAX_BODY:
                raise LinkRefusedError(f"length {length}")
            if len(self.buffer) < 5 + length:
                break
            out.append((kind, self.buffer[5 : 5 + length]))
            self.buffer = self.buffer[5 + length :]
        return out


# --- handshake bodies -------------------------------------------------------------------------


def hello_body(sender: str, target: str, epoch: int, nonce: bytes, relay: bool) -> bytes:
    members: list[tuple[str, str | int]] = [
        ("v", 1), ("from", sender), ("to", target), ("epoch", epoch), ("nonce", b64(nonce))
    ]  # fmt: skip
    return compact(members + ([("relay", 1)] if relay else []))


def welcome_body(nonce: bytes, epoch: int, acked: int, mac_: bytes, relay: bool) -> bytes:
    members: list[tuple[str, str | int]] = [
        ("v", 1), ("nonce", b64(nonce)), ("epoch", epoch), ("acked", acked), ("mac", b64(mac_))
    ]  # fmt: skip
    return compact(members + ([("relay", 1)] if relay else []))


def auth_body(mac_: bytes) -> bytes:
    return compact([("mac", b64(mac_))])


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError) as exc:
        raise LinkRefusedError("not UTF-8 JSON") from exc
    if not isinstance(data, dict):
        raise LinkRefusedError("not an object")
    return data


def _integer(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise LinkRefusedError(f"{name}: not an integer in range")
    return value


def _string(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= 256:
        raise LinkRefusedError(f"{name}: not a string of 1-256 characters")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise LinkRefusedError(f"{name}: not valid Unicode")
    return value


def _bytes32(data: dict[str, Any], name: str) -> bytes:
    text = _string(data, name)
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise LinkRefusedError(f"{name}: not base64") from exc
    if len(raw) != 32:
        raise LinkRefusedError(f"{name}: not 32 bytes")
    return raw


def _version(data: dict[str, Any]) -> None:
    if _integer(data, "v") != 1:
        raise LinkRefusedError("version")


def _relay(data: dict[str, Any]) -> bool:
    if "relay" not in data:
        return False
    if type(data["relay"]) is not int or data["relay"] != 1:
        raise LinkRefusedError("relay: not 1")
    return True


def parse_hello(body: bytes) -> tuple[str, str, int, bytes, bool]:
    d = _object(body)
    _version(d)
    return (
        _string(d, "from"), _string(d, "to"), _integer(d, "epoch"), _bytes32(d, "nonce"),
        _relay(d),
    )  # fmt: skip


def parse_welcome(body: bytes) -> tuple[bytes, int, int, bytes, bool]:
    d = _object(body)
    _version(d)
    return (
        _bytes32(d, "nonce"), _integer(d, "epoch"), _integer(d, "acked"), _bytes32(d, "mac"),
        _relay(d),
    )  # fmt: skip


def parse_auth(body: bytes) -> bytes:
    return _bytes32(_object(body), "mac")


def transcript(
    a: str, b: str, ea: int, na: bytes, nb: bytes, eb: int, k: int, relay: bool
) -> bytes:
    t = L(a.encode()) + L(b.encode()) + u64(ea) + L(na) + L(nb) + u64(eb) + u64(k)
    return t + (b"relay" if relay else b"")


def keys(secret: bytes, t: bytes) -> tuple[bytes, bytes, bytes]:
    """(welcome mac, auth mac, session key K)."""
    return (
        mac(secret, b"qcall-link-v1 welcome" + t),
        mac(secret, b"qcall-link-v1 auth" + t),
        mac(secret, b"qcall-link-v1 session" + t),
    )


def tag(k: bytes, kind: int, data: bytes) -> bytes:
    return mac(k, u8(kind) + data)[:TAG_LEN]


def tagged(k: bytes, kind: int, data: bytes) -> bytes:
    return frame(kind, tag(k, kind, data) + data)


# --- messages -----------------------------------------------------------------------------------


def _spaced(members: list[tuple[str, str | int]]) -> bytes:
    """A header line: ``", "`` between members, ``": "`` after names."""
    parts = [f"{jstr(k)}: {jstr(v) if isinstance(v, str) else int(v)}" for k, v in members]
    return ("{" + ", ".join(parts) + "}").encode()


def client_message(name: str, fp: str, inst: str, epoch: int, seq: int, body: bytes) -> bytes:
    members: list[tuple[str, str | int]] = [
        ("from", name), ("fp", fp), ("inst", inst), ("epoch", epoch), ("seq", seq)
    ]  # fmt: skip
    return _spaced(members) + b"\n" + body


def relay_message(
    name: str, fp: str, inst: str, epoch: int, call: str, kind: str, seq: int, body: bytes
) -> bytes:
    members: list[tuple[str, str | int]] = [
        ("relay", name), ("fp", fp), ("inst", inst), ("epoch", epoch), ("call", call),
        ("type", kind), ("seq", seq),
    ]  # fmt: skip
    return _spaced(members) + b"\n" + body


def relayed_body(
    kind: str, call_id: str, peer: str, fp: str, payload: str, reason: str | None = None
) -> bytes:
    members: list[tuple[str, str | int]] = [
        ("type", kind), ("call_id", call_id), ("peer", peer), ("fingerprint", fp)
    ]  # fmt: skip
    if reason is not None:
        members.append(("reason", reason))
    return compact([*members, ("payload", payload)])


def relay_head_ok(body: str, kind: str, call: str, name: str, fp: str) -> bool:
    """The receiving instance's check of a relay frame's body (its start and end)."""
    head = f'{{"type":{jstr(kind)},"call_id":{jstr(call)},"peer":{jstr(name)},'
    head += f'"fingerprint":{jstr(fp)},'
    return body.startswith(head) and body.endswith("}")


# --- the two ends ---------------------------------------------------------------------------------


class Delivery:
    """Which numbered frames an instance delivers (per sender: epoch, last seq)."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, int]] = {}

    def fresh(self, inst: str, epoch: int, seq: int) -> bool:
        known = self.last.get(inst)
        if known is None or epoch > known[0] or (epoch == known[0] and seq > known[1]):
            self.last[inst] = (epoch, seq)
            return True
        return False

    def acked(self, inst: str, epoch: int) -> int:
        known = self.last.get(inst)
        return known[1] if known is not None and known[0] == epoch else 0


class Listener:
    """B: reads a ``HELLO`` and an ``AUTH``, then ``FRAME``s; writes ``WELCOME`` and ``ACK``s."""

    def __init__(
        self, me: str, secret: bytes, epoch: int, nonce: bytes, delivery: Delivery,
        takes_relay: bool = True,
    ) -> None:  # fmt: skip
        self.me, self.secret, self.epoch, self.nonce = me, secret, epoch, nonce
        self.delivery, self.takes_relay = delivery, takes_relay
        self.reader = Reader()
        self.state = "hello"
        self.peer, self.peer_epoch, self.last = "", 0, 0
        self.auth_mac, self.k = b"", b""
        self.delivered: list[tuple[dict[str, Any], str]] = []
        self.closed = False

    def receive(self, data: bytes) -> bytes:
        out = b""
        for kind, body in self.reader.feed(data):
            if kind == ERROR:
                self.closed = True
                return out
            out += self._one(kind, body)
        return out

    def _one(self, kind: int, body: bytes) -> bytes:
        if self.state == "hello":
            if kind != HELLO:
                raise LinkRefusedError("hello expected")
            sender, target, epoch, nonce, relay = parse_hello(body)
            if target != self.me or sender == self.me:
                raise LinkRefusedError("not this instance, or itself")
            self.peer, self.peer_epoch = sender, epoch
            self.last = self.delivery.acked(sender, epoch)
            relay = relay and self.takes_relay
            t = transcript(sender, target, epoch, nonce, self.nonce, self.epoch, self.last, relay)
            welcome_mac, self.auth_mac, self.k = keys(self.secret, t)
            self.state = "auth"
            return frame(
                WELCOME, welcome_body(self.nonce, self.epoch, self.last, welcome_mac, relay)
            )
        if self.state == "auth":
            if kind != AUTH or not hmac.compare_digest(parse_auth(body), self.auth_mac):
                raise LinkRefusedError("authentication failed")
            self.state = "up"
            return b""
        if kind != FRAME:
            raise LinkRefusedError("only FRAME on an open link")
        return self._frame(body)

    def _frame(self, body: bytes) -> bytes:
        if len(body) < TAG_LEN:
            raise LinkRefusedError("shorter than its tag")
        message = body[TAG_LEN:]
        if not hmac.compare_digest(tag(self.k, FRAME, message), body[:TAG_LEN]):
            raise LinkRefusedError("bad tag")
        line, sep, rest = message.partition(b"\n")
        try:
            header = json.loads(line.decode("utf-8")) if sep else None
        except (UnicodeDecodeError, ValueError):
            header = None
        if not isinstance(header, dict) or not {"inst", "epoch", "seq"} <= header.keys():
            raise LinkRefusedError("header")
        epoch, seq = header["epoch"], header["seq"]
        if header["inst"] != self.peer or type(epoch) is not int or epoch != self.peer_epoch:
            raise LinkRefusedError("another instance or epoch")
        if type(seq) is not int or seq <= self.last:
            raise LinkRefusedError("seq not after the last")
        self.last = seq
        try:
            text = rest.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LinkRefusedError("not UTF-8") from exc
        if self.delivery.fresh(self.peer, epoch, seq):
            self.delivered.append((header, text))
        return b""

    def ack(self) -> bytes:
        """Acknowledge what was delivered of the peer's epoch (by either path)."""
        return tagged(self.k, ACK, u64(self.delivery.acked(self.peer, self.peer_epoch)))


class Dialer:
    """A: writes a ``HELLO``, reads a ``WELCOME``, writes the ``AUTH``, then ``FRAME``s."""

    def __init__(
        self, me: str, peer: str, secret: bytes, epoch: int, nonce: bytes, relay: bool,
        numbered: int = 0,
    ) -> None:  # fmt: skip
        self.me, self.peer, self.secret, self.epoch = me, peer, secret, epoch
        self.nonce, self.offers_relay = nonce, relay
        self.seq = numbered  # the last seq numbered for the peer (frames over Redis count)
        self.acked = 0
        self.reader = Reader()
        self.up = self.relay = self.closed = False
        self.k = b""

    def hello(self) -> bytes:
        return frame(
            HELLO, hello_body(self.me, self.peer, self.epoch, self.nonce, self.offers_relay)
        )

    def receive(self, data: bytes) -> bytes:
        out = b""
        for kind, body in self.reader.feed(data):
            if kind == ERROR:
                self.closed = True
                return out
            out += self._one(kind, body)
        return out

    def _one(self, kind: int, body: bytes) -> bytes:
        if not self.up:
            if kind != WELCOME:
                raise LinkRefusedError("welcome expected")
            nonce, epoch, acked, welcome_mac, relay = parse_welcome(body)
            if relay and not self.offers_relay:
                raise LinkRefusedError("relay not offered")
            t = transcript(self.me, self.peer, self.epoch, self.nonce, nonce, epoch, acked, relay)
            expected, auth_mac, self.k = keys(self.secret, t)
            if not hmac.compare_digest(welcome_mac, expected):
                raise LinkRefusedError("peer failed authentication")
            self.up, self.relay, self.acked = True, relay, min(acked, self.seq)
            return frame(AUTH, auth_body(auth_mac))
        if kind != ACK:
            raise LinkRefusedError("only ACK from the listener")
        if len(body) < TAG_LEN:
            raise LinkRefusedError("shorter than its tag")
        data = body[TAG_LEN:]
        if not hmac.compare_digest(tag(self.k, ACK, data), body[:TAG_LEN]):
            raise LinkRefusedError("bad tag")
        if len(data) != 8:
            raise LinkRefusedError("not 8 bytes")
        (seq,) = struct.unpack(">Q", data)
        if seq > self.seq:
            raise LinkRefusedError("ack for a frame never sent")
        self.acked = max(self.acked, seq)
        return b""

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send(self, message: bytes) -> bytes:
        return tagged(self.k, FRAME, message)
