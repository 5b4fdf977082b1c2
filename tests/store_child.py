"""Child process for tests/test_signaling_store.py: puts envelopes, prints each one acknowledged.

``python -m tests.store_child DB COUNT`` (DB: a file, or a ``postgresql://`` URL):
envelope ``i`` is ``b"envelope %d"`` with client_ref ``b"ref %d"``, put by 4
concurrent tasks (so commits group several puts); once a put returns (committed)
it prints ``i id``. Run again after a SIGKILL, it resends everything from 0: the
client_refs make that idempotent.
"""

from __future__ import annotations

import asyncio
import sys

from signaling.store import MessageStore, SQLiteMessageStore


async def main(path: str, count: int) -> None:
    store: MessageStore
    if path.startswith("postgresql://"):
        from signaling.pgstore import PostgresMessageStore

        store = await PostgresMessageStore.connect(path)
    else:
        store = SQLiteMessageStore(path)

    async def worker(start: int) -> None:
        for i in range(start, count, 4):
            envelope_id = await store.put("bob", "alice", b"envelope %d" % i, 1000.0, b"ref %d" % i)
            print(i, envelope_id, flush=True)

    await asyncio.gather(*(worker(k) for k in range(4)))
    await store.close()
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
