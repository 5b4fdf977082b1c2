#!/usr/bin/env python3
"""What the client store costs per message sent one at a time: CPU and WAL bytes.

Usage::

    python scripts/store_session_cost.py [--messages 400] [--rounds 3] [--tree DIR]

Each message is what ``MessagingClient.send_text`` does to the store around the
ratchet step: one transaction that loads the session, advances it (one
``Session.encrypt``) and saves it, committed with ``synchronous=FULL`` (the history
row and outbox entry, the same in every version, are left out). It prints, as the
median over ``--rounds``, µs of CPU per message (``time.process_time``) and bytes
appended to the WAL per message (automatic checkpoints off). ``--tree DIR`` measures
the qcall of another checkout (e.g. main's) with this script, for an A/B
(``docs/performance.md``, "Client CPU per encrypted message, round 2"). The session
is set up with the test suite's helpers (``tests/messaging_utils.py``).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path


def one_round(messages: int) -> tuple[float, float]:
    """(µs of CPU, WAL bytes) per message for ``messages`` one-at-a-time sends."""
    store_module = importlib.import_module("qcall.messaging.store")
    utils = importlib.import_module("tests.messaging_utils")
    now = utils.NOW
    with tempfile.TemporaryDirectory() as tmp:
        store = store_module.ClientStore(Path(tmp) / "messages.db", b"\x11" * 32)
        store._db.execute("PRAGMA wal_autocheckpoint = 0")
        a, _, _ = utils.start(utils.User.make("alice"), utils.User.make("bob"))
        with store.transaction():
            store.save_session(a.state, now)
        wal = Path(tmp) / "messages.db-wal"
        size = wal.stat().st_size
        t0 = time.process_time()
        for _ in range(messages):
            with store.transaction():
                state = store.session(a.session_id)
                assert state is not None
                a.encrypt(b"x" * 60, now)
                store.save_session(a.state, now)
        cpu = (time.process_time() - t0) / messages * 1e6
        grown = (wal.stat().st_size - size) / messages
        store.close()
    return cpu, grown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    here = Path(__file__).resolve().parent.parent
    parser.add_argument("--tree", type=Path, default=here, help="checkout to measure")
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    rounds = [one_round(args.messages) for _ in range(args.rounds)]
    cpu = statistics.median(r[0] for r in rounds)
    wal = statistics.median(r[1] for r in rounds)
    print(f"store per one-at-a-time send: {cpu:.0f} µs CPU, {wal:.0f} WAL bytes "
          f"({args.messages} messages, medians of {args.rounds} rounds; {args.tree})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
