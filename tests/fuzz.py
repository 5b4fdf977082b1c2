"""A small seeded mutator shared by the fuzz tests (tests/test_fuzz_*.py).

It turns a corpus of valid inputs into hostile ones, AFL "havoc" style: byte
flips, insertions, deletions, duplications, truncations and splices on the raw
bytes, plus structure-aware mutations of JSON objects (type confusion, huge
numbers, deep nesting, Unicode edge cases, missing and unknown members). The
same seed always gives the same sequence, so a failure is reproduced by its
seed and index.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

__all__ = ["INTERESTING_TEXTS", "INTERESTING_VALUES", "Mutator"]

#: Unicode edge cases: NUL, controls, lone surrogates (as JSON escapes), BOM,
#: bidi overrides, non-characters, combining marks, astral characters, RTL.
INTERESTING_TEXTS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "\x7f",
    "\u0085",
    "\u2028",
    "\ufeff",
    "\u202e",
    "\ufffe",
    "\uffff",
    "e\u0301",
    "\U0001f600",
    "\U0010ffff",
    "\u05d0\u05d1",
    "a" * 65,
    "a" * 129,
    "A" * 300,
    "../../etc/passwd",
    "%s%n",
    "null",
)

#: JSON values of every type, including hostile ones.
INTERESTING_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    -(2**63) - 1,
    2**64,
    1.5,
    -0.0,
    1e308,
    [],
    {},
    [None],
    {"": ""},
    *INTERESTING_TEXTS,
)

#: Raw JSON fragments that json.dumps cannot produce.
RAW_FRAGMENTS: tuple[bytes, ...] = (
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1" * 5000,  # beyond Python's int-string conversion limit
    b"1e999999",
    b"-0",
    b'"\\ud800"',  # lone high surrogate
    b'"\\udc00"',  # lone low surrogate
    b'"\\u0000"',
    b'"\\x"',
    b"[" * 5000 + b"]" * 5000,  # deep nesting
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b"[" * 100_000,
    b"\xef\xbb\xbf{}",  # UTF-8 BOM
    b"\xff\xfe",
    b"\xc0\x80",  # overlong NUL
    b"\xed\xa0\x80",  # UTF-8-encoded surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
)

_SPECIAL_BYTES = b'\x00\xff{}[]",:\\ 0-9eE.+\n\t\x7f\x80'


class Mutator:
    """Seeded generator of hostile inputs from a corpus of valid ones.

    Args:
        seed: the random seed (the same seed gives the same inputs).
        corpus: valid inputs (bytes); JSON objects among them also get
            structure-aware mutations.
    """

    def __init__(self, seed: int, corpus: Sequence[bytes]) -> None:
        if not corpus:
            raise ValueError("the corpus must not be empty")
        self.random = random.Random(seed)
        self.corpus = list(corpus)
        self.objects: list[dict[str, Any]] = []
        for item in corpus:
            try:
                obj = json.loads(item)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self.objects.append(obj)

    # --- entry points -------------------------------------------------------------------

    def mutate(self) -> bytes:
        """Return one hostile input (mostly mutated corpus items, some pure noise)."""
        r = self.random.random()
        if r < 0.05:
            return self.noise()
        if r < 0.45 and self.objects:
            return self.structured(self.random.choice(self.objects))
        return self.havoc(self.random.choice(self.corpus))

    def noise(self) -> bytes:
        """Random bytes or a raw fragment."""
        if self.random.random() < 0.5:
            return self.random.choice(RAW_FRAGMENTS)
        return self.random.randbytes(self.random.randrange(0, 300))

    def havoc(self, data: bytes, rounds: int | None = None) -> bytes:
        """Apply 1-8 random byte-level mutations to ``data``."""
        buf = bytearray(data)
        for _ in range(rounds or self.random.randint(1, 8)):
            self._byte_mutation(buf)
        return bytes(buf)

    def structured(self, obj: dict[str, Any]) -> bytes:
        """Mutate one member of a JSON object (or the object itself) and encode it."""
        rnd = self.random
        obj = dict(obj)
        keys = list(obj)
        op = rnd.randrange(8)
        if op == 0 and keys:  # type confusion / hostile value
            obj[rnd.choice(keys)] = rnd.choice(INTERESTING_VALUES)
        elif op == 1 and keys:  # missing member
            del obj[rnd.choice(keys)]
        elif op == 2:  # unknown member
            obj[rnd.choice(INTERESTING_TEXTS)] = rnd.choice(INTERESTING_VALUES)
        elif op == 3 and keys:  # a raw fragment in place of a value
            key = rnd.choice(keys)
            obj[key] = "\x00MARK\x00"
            text = json.dumps(obj).encode()
            return text.replace(b'"\\u0000MARK\\u0000"', rnd.choice(RAW_FRAGMENTS), 1)
        elif op == 4 and keys:  # string edits: edge characters, lengths
            key = rnd.choice(keys)
            value = obj[key]
            if isinstance(value, str):
                cut = rnd.randrange(len(value) + 1)
                obj[key] = value[:cut] + rnd.choice(INTERESTING_TEXTS) + value[cut:]
            else:
                obj[key] = [value]
        elif op == 5:  # wrong container
            return json.dumps(rnd.choice([[obj], list(obj.values()), str(obj), len(obj)])).encode()
        elif op == 6 and keys:  # a member holds the whole object (nesting)
            obj[rnd.choice(keys)] = dict(obj)
        else:  # byte-level on top of a valid encoding
            return self.havoc(json.dumps(obj).encode(), 2)
        return json.dumps(obj, ensure_ascii=rnd.random() < 0.5).encode("utf-8", "surrogatepass")

    # --- internals ------------------------------------------------------------------------

    def _byte_mutation(self, buf: bytearray) -> None:
        rnd = self.random
        op = rnd.randrange(8)
        pos = rnd.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            pos = min(pos, len(buf) - 1)
            buf[pos] ^= 1 << rnd.randrange(8)
        elif op == 1 and buf:  # a special byte
            buf[min(pos, len(buf) - 1)] = rnd.choice(_SPECIAL_BYTES)
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rnd.randbytes(rnd.randint(1, 16))
        elif op == 3 and buf:  # delete a range
            del buf[pos : pos + rnd.randint(1, 32)]
        elif op == 4 and buf:  # duplicate a range
            end = min(len(buf), pos + rnd.randint(1, 64))
            buf[pos:pos] = buf[pos:end]
        elif op == 5:  # truncate
            del buf[pos:]
        elif op == 6:  # splice with another corpus item
            other = rnd.choice(self.corpus)
            cut = rnd.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        else:  # insert a raw fragment
            buf[pos:pos] = rnd.choice(RAW_FRAGMENTS)[:200]
