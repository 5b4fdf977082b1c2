"""QKD key prefetch: a small per-peer reservoir of ``enc_keys`` keys, each used once.

A caller needs one fresh QKD key (ETSI GS QKD 014 ``enc_keys``, master role) for
every call it places. Fetched at dial time, that KME round trip sits on the
set-up path (docs/performance.md, "round 3"). Like a quantum SIM card charged
with keys before use, a :class:`KeyReservoir` holds a few keys per peer SAE,
fetched *in the background* once a call is set up, so the next call to that
peer takes its key from memory (docs/qkd-keys.md has the rules; this module is
their implementation):

* **Exactly once.** :meth:`ReservoirCore.take` removes the key it returns; a
  key_ID handed out (or held) before is refused if a KME delivers it again.
  A key that left the reservoir is never put back, whatever becomes of its
  call.
* **Bounded.** At most ``keys_per_peer`` keys for each of at most ``max_peers``
  peers (the least recently used peer's keys are wiped to make room).
* **Expiring.** A key not used within ``max_age`` seconds of its fetch is
  wiped and never used: the peer's KME just keeps the unfetched key until its
  own key lifetime ends. Expiry does not trigger a refill, so a peer that is
  not called costs at most ``keys_per_peer`` keys.
* **Wiped.** The reservoir keeps each key's bytes in a ``bytearray`` that it
  overwrites with zeros when the key is taken (after copying it into the
  :class:`~qcall.qkd.etsi014.QKDKey` handed out), expires, is discarded or the
  reservoir closes. (The immutable ``bytes`` of the parsed KME answer are
  released at once, as for every key qcall receives.)
* **Silent about keys.** ``repr`` and the logs give counts and key_IDs, never
  key bytes.

:class:`ReservoirCore` is the pure part (``now`` passed in, no I/O);
:class:`KeyReservoir` is its asyncio shell around a
:class:`~qcall.qkd.client.KeySource`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from qcall.exceptions import ConfigError, QKDError
from qcall.qkd.client import KeySource
from qcall.qkd.etsi014 import QKDKey

__all__ = ["KeyReservoir", "ReservoirConfig", "ReservoirCore"]

logger = logging.getLogger(__name__)

#: How many key_IDs the reservoir remembers having held, to refuse a re-delivery.
SEEN_IDS: Final = 4096


@dataclass(frozen=True)
class ReservoirConfig:
    """How many QKD keys to prefetch per peer, and for how long to hold them.

    Attributes:
        keys_per_peer: keys held for each peer SAE (0: no prefetch, every call
            fetches its key at dial time).
        max_age: seconds a held key may wait for a call; older keys are wiped,
            never used. Keep it below the key lifetime of the peer's KME.
        max_peers: peers with held keys at once (least recently used first out).
        size_bits: key size asked for (``None``: the KME's default, as at dial).
    """

    keys_per_peer: int = 2
    max_age: float = 120.0
    max_peers: int = 8
    size_bits: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.keys_per_peer <= 16:
            raise ConfigError(f"qkd prefetch: keys per peer must be 0–16, not {self.keys_per_peer}")
        if not 0 < self.max_age <= 86400:
            raise ConfigError(f"qkd prefetch: max_age must be in (0, 86400] s, not {self.max_age}")
        if not 1 <= self.max_peers <= 1024:
            raise ConfigError(f"qkd prefetch: max_peers must be 1–1024, not {self.max_peers}")

    @property
    def enabled(self) -> bool:
        """Whether keys are prefetched at all."""
        return self.keys_per_peer > 0


class _Held:
    """One held key: its key_ID, its bytes (wiped on the way out), when it was fetched."""

    __slots__ = ("buf", "fetched_at", "key")

    def __init__(self, key: QKDKey, fetched_at: float) -> None:
        self.buf = bytearray(key.key)
        self.key = QKDKey(key.key_id, b"", key.key_id_extension, key.key_extension)
        self.fetched_at = fetched_at

    def release(self) -> QKDKey:
        """The key, for one use; the held copy is overwritten."""
        key = QKDKey(
            self.key.key_id, bytes(self.buf), self.key.key_id_extension, self.key.key_extension
        )
        self.wipe()
        return key

    def wipe(self) -> None:
        self.buf[:] = bytes(len(self.buf))
        self.buf = bytearray()


class ReservoirCore:
    """The reservoir's state and rules (pure: ``now`` is passed in, nothing is fetched)."""

    def __init__(self, config: ReservoirConfig) -> None:
        self.config = config
        self._held: OrderedDict[str, deque[_Held]] = OrderedDict()  # peer → oldest first
        self._seen: OrderedDict[str, None] = OrderedDict()  # key_IDs held (lower case)
        #: Keys taken, expired and discarded so far (counts only).
        self.taken = self.expired = self.discarded = 0

    def __repr__(self) -> str:
        c = self.config
        return (
            f"<ReservoirCore {self.total()} keys for {len(self._held)} peers "
            f"(≤ {c.keys_per_peer}/peer, {c.max_age:g} s): taken {self.taken}, "
            f"expired {self.expired}, discarded {self.discarded}>"
        )

    def held(self, peer: str) -> int:
        """Keys held for ``peer`` (expired ones included until :meth:`expire`)."""
        return len(self._held.get(peer, ()))

    def total(self) -> int:
        """Keys held for all peers."""
        return sum(len(q) for q in self._held.values())

    def missing(self, peer: str, now: float) -> int:
        """How many keys a refill for ``peer`` should fetch (after expiring old ones)."""
        self.expire(now)
        return max(0, self.config.keys_per_peer - self.held(peer))

    def add(self, peer: str, keys: Iterable[QKDKey], now: float) -> list[str]:
        """Hold ``keys`` (just fetched for ``peer``); return the key_IDs held.

        A key_ID held before (a KME delivering a key twice) is refused, and keys
        beyond ``keys_per_peer`` are wiped (two refills crossing): never used.
        """
        queue = self._held.setdefault(peer, deque())
        self._held.move_to_end(peer)
        added: list[str] = []
        for key in keys:
            kid = key.key_id.lower()
            if kid in self._seen:
                logger.warning("! QKD key %s delivered again for %s: refused", key.key_id, peer)
                self.discarded += 1
                continue
            self._remember(kid)
            if len(queue) >= self.config.keys_per_peer:
                self.discarded += 1
                continue
            queue.append(_Held(key, now))
            added.append(key.key_id)
        while len(self._held) > self.config.max_peers:
            oldest, _ = next(iter(self._held.items()))
            self.discard(oldest)
        if not queue:
            del self._held[peer]
        return added

    def take(self, peer: str, now: float) -> QKDKey | None:
        """Remove and return ``peer``'s oldest key younger than ``max_age``, or None."""
        self.expire(now)
        queue = self._held.get(peer)
        if not queue:
            return None
        held = queue.popleft()
        if not queue:
            del self._held[peer]
        self.taken += 1
        return held.release()

    def expire(self, now: float) -> int:
        """Wipe every key fetched more than ``max_age`` ago; return how many."""
        limit = now - self.config.max_age
        gone = 0
        for peer in list(self._held):
            queue = self._held[peer]
            while queue and queue[0].fetched_at <= limit:
                queue.popleft().wipe()
                gone += 1
            if not queue:
                del self._held[peer]
        self.expired += gone
        return gone

    def next_expiry(self) -> float | None:
        """When the oldest held key expires (same clock as ``now``), or None."""
        firsts = [q[0].fetched_at for q in self._held.values() if q]
        return min(firsts) + self.config.max_age if firsts else None

    def discard(self, peer: str) -> int:
        """Wipe all of ``peer``'s keys (e.g. a link alarm on its route); return how many."""
        queue = self._held.pop(peer, deque())
        for held in queue:
            held.wipe()
        self.discarded += len(queue)
        return len(queue)

    def clear(self) -> int:
        """Wipe every held key; return how many."""
        return sum(self.discard(peer) for peer in list(self._held))

    def _remember(self, key_id: str) -> None:
        self._seen[key_id] = None
        while len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)


class KeyReservoir:
    """Prefetched QKD keys for the calls a phone places (shell of :class:`ReservoirCore`).

    Args:
        source: the key source (``enc_keys``); not closed by :meth:`close`.
        config: sizes and expiry; ``keys_per_peer=0`` turns prefetch off.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        source: KeySource,
        config: ReservoirConfig | None = None,
        *,
        clock: Any = time.monotonic,
    ) -> None:
        self.source = source
        self.core = ReservoirCore(config or ReservoirConfig())
        self.clock = clock
        #: The last refill failure per peer (said in the dial's error if no key at all).
        self.last_error: dict[str, str] = {}
        self._refills: dict[str, asyncio.Task[int]] = {}
        self._waiters: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._suspended: set[str] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<KeyReservoir {self.core!r}>"

    @property
    def enabled(self) -> bool:
        """Whether keys are prefetched."""
        return self.core.config.enabled and not self._closed

    def take(self, peer: str) -> QKDKey | None:
        """A prefetched key for ``peer`` (removed: used once), or None."""
        if not self.enabled:
            return None
        key = self.core.take(peer, self.clock())
        if key is not None:
            logger.debug("= QKD key %s for %s from the reservoir", key.key_id, peer)
            self._arm_timer()
        return key

    def discard(self, peer: str) -> None:
        """Wipe ``peer``'s held keys (never used)."""
        if self.core.discard(peer):
            logger.info("= QKD reservoir: %s's held keys discarded", peer)

    def suspend(self, peer: str) -> None:
        """Wipe ``peer``'s held keys and refill none until :meth:`resume` (a link alarm)."""
        self._suspended.add(peer)
        self.discard(peer)

    def resume(self, peer: str) -> None:
        """Allow refills for ``peer`` again (its KME's Status shows no alarm)."""
        self._suspended.discard(peer)

    def refill(self, peer: str) -> asyncio.Task[int] | None:
        """Top ``peer``'s keys up in the background (one refill per peer at a time)."""
        if not self.enabled or peer in self._suspended:
            return None
        running = self._refills.get(peer)
        if running is not None and not running.done():
            return running
        task = asyncio.ensure_future(self.fill(peer))
        self._refills[peer] = task
        task.add_done_callback(self._refill_done)
        return task

    def _refill_done(self, task: asyncio.Task[int]) -> None:
        for peer, running in list(self._refills.items()):
            if running is task:
                del self._refills[peer]
        if not task.cancelled() and task.exception() is not None:
            logger.warning("! QKD reservoir refill failed: %r", task.exception())

    def refill_after(self, peer: str, *events: asyncio.Future[Any]) -> None:
        """Refill ``peer``'s keys once the first of ``events`` is done (e.g. the call is up).

        So the refill's KME request never competes with a call's set-up.
        """
        if not self.enabled:
            return

        async def wait_then_refill() -> None:
            await asyncio.wait(events, return_when=asyncio.FIRST_COMPLETED)
            self.refill(peer)

        waiter = asyncio.ensure_future(wait_then_refill())
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)

    async def fill(self, peer: str) -> int:
        """Fetch the keys ``peer`` is missing (one ``enc_keys``); return how many are held.

        A KME failure is logged and kept in :attr:`last_error`; the next dial
        then fetches its key itself.
        """
        want = self.core.missing(peer, self.clock())
        if want == 0 or not self.enabled:
            return 0
        try:
            keys = await self.source.get_keys(
                peer, want, self.core.config.size_bits, application="call-setup"
            )
        except QKDError as exc:
            self.last_error[peer] = str(exc)
            logger.info("! QKD reservoir refill for %s failed: %s", peer, exc)
            return 0
        if self._closed or peer in self._suspended:  # meanwhile: never held
            return 0
        self.last_error.pop(peer, None)
        added = self.core.add(peer, keys, self.clock())
        logger.debug("< QKD reservoir for %s: %s", peer, added)
        self._arm_timer()
        return len(added)

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self.core.next_expiry()
        if due is None or self._closed:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, due - self.clock())
        self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        gone = self.core.expire(self.clock())
        if gone:
            logger.debug("= QKD reservoir: %d unused keys expired and wiped", gone)
        self._arm_timer()

    async def close(self) -> None:
        """Stop refilling and wipe every held key. Safe to call twice."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = [*self._refills.values(), *self._waiters]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.core.clear()
