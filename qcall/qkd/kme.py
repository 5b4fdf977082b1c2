"""A key management entity (KME): ETSI GS QKD 014 key pools, as a pure state machine.

:class:`KME` holds the keys one site's KME can deliver to its SAEs, in one
pool per *ordered* pair (master SAE, slave SAE). It does no I/O and reads no
clock: time is passed in as ``now`` (seconds, any monotonic origin). The
aiohttp server in :mod:`qcall.qkd.server` is a thin shell around it.

Two KMEs, one pair (the normal case of a QKD network)::

    kme_a = KME("KME_A")          # hosts SAE "alice"
    kme_b = KME("KME_B")          # hosts SAE "bob"
    keys = random_keys(10, 256)   # in reality: relayed QKD keys
    kme_a.supply("alice", "bob", keys, role="master", peer_kme_id="KME_B")
    kme_b.supply("alice", "bob", keys, role="slave", peer_kme_id="KME_A")

A key in a ``master`` pool is delivered once, by ``enc_keys`` to the master
SAE, then erased; a key in a ``slave`` pool once, by ``dec_keys`` to the slave
SAE, then erased. In a ``local`` pool (one KME hosting both SAEs) a key is
first delivered by ``enc_keys`` to the master, then waits for the slave's
``dec_keys``, then is erased.

Key sizes (ETSI GS QKD 014, 6.1 and 6.2): keys are supplied in blocks of
``key_size`` bits (default 256); an SAE may ask for any ``size`` that is a
multiple of 8 between ``min_key_size`` (default 64) and ``max_key_size``
(default 4096), and gets ``key_size`` when it names none. Every pool is a byte
stream: a key of ``size`` bits consumes exactly ``size / 8`` bytes of it,
cut from one block or joined across consecutive ones, and the slave's KME
finds the same bytes from the key_ID alone (:mod:`qcall.qkd.keypool`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final

from qcall.exceptions import KMEUnauthorizedError, KMEUnavailableError
from qcall.qkd.etsi014 import (
    APPLICATION_EXTENSION,
    UNTAGGED,
    KeyContainer,
    KeyRequest,
    KeyStatus,
    QKDKey,
    bad_request,
    request_application,
    validate_application,
    validate_key_id,
    validate_sae_id,
)
from qcall.qkd.keypool import MAX_BLOCK_BYTES, MAX_CUT_BYTES, KeyPool, PoolRole
from qcall.typing import KeyId, SAEId

__all__ = ["KME", "PoolRole", "random_keys"]

#: Default key size (Status ``key_size``) and size of supplied keys, in bits.
DEFAULT_KEY_SIZE: Final = 256

#: Default smallest and largest key an SAE may ask for (Status ``min_key_size``,
#: ``max_key_size``), in bits; widened to include ``key_size`` if needed.
DEFAULT_MIN_KEY_SIZE: Final = 64
DEFAULT_MAX_KEY_SIZE: Final = 4096

#: Largest ``max_key_size`` (and ``key_size``) a KME accepts, in bits.
MAX_KEY_SIZE: Final = 8 * min(MAX_CUT_BYTES, MAX_BLOCK_BYTES)


def random_keys(count: int, size_bits: int = DEFAULT_KEY_SIZE) -> list[tuple[KeyId, bytes]]:
    """Return ``count`` fresh ``(key_ID, key)`` pairs from ``os.urandom``.

    For tests, benchmarks and a stand-alone KME: these are *not* QKD keys.
    """
    if size_bits <= 0 or size_bits % 8:
        raise ValueError("size_bits must be a positive multiple of 8")
    return [(KeyId(str(uuid.uuid4())), os.urandom(size_bits // 8)) for _ in range(count)]


def _size_bits(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer number of bits")
    if value <= 0 or value % 8 or value > MAX_KEY_SIZE:
        raise ValueError(f"{name} must be a positive multiple of 8 up to {MAX_KEY_SIZE}")
    return value


class KME:
    """Key pools per ordered (master SAE, slave SAE) pair; ETSI GS QKD 014 semantics.

    Args:
        kme_id: this KME's ID (``source_KME_ID``/``target_KME_ID`` in Status).
        key_size: the default key size (Status ``key_size``) and the size of
            every supplied key, in bits (a positive multiple of 8).
        min_key_size: the smallest ``size`` an SAE may ask for (default:
            64, or ``key_size`` if smaller).
        max_key_size: the largest ``size`` an SAE may ask for (default:
            4096, or ``key_size`` if larger; at most 524,280).
        max_key_count: most keys of ``key_size`` bits a pool holds (Status
            ``max_key_count``; the pool holds that many times ``key_size`` bits).
        max_key_per_request: most keys per ``enc_keys``/``dec_keys`` call.
        key_lifetime: seconds after which :meth:`expire` erases an
            undelivered key (``None``: never).

    The request methods (:meth:`status`, :meth:`enc_keys`, :meth:`dec_keys`)
    take the *authenticated* caller SAE ID and raise :class:`KMEBadRequestError`
    (400), :class:`KMEUnauthorizedError` (401) or :class:`KMEUnavailableError`
    (503), whose ``message`` is the spec's Error ``message``. They are
    all-or-nothing: a failed request consumes no key.

    Not thread-safe: drive it from one thread (the event loop of its server).
    """

    def __init__(
        self,
        kme_id: str,
        *,
        key_size: int = DEFAULT_KEY_SIZE,
        min_key_size: int | None = None,
        max_key_size: int | None = None,
        max_key_count: int = 100_000,
        max_key_per_request: int = 128,
        key_lifetime: float | None = None,
    ) -> None:
        self.kme_id = validate_sae_id(kme_id, "KME ID")
        key_size = _size_bits(key_size, "key_size")
        if min_key_size is None:
            min_key_size = min(DEFAULT_MIN_KEY_SIZE, key_size)
        if max_key_size is None:
            max_key_size = max(DEFAULT_MAX_KEY_SIZE, key_size)
        min_key_size = _size_bits(min_key_size, "min_key_size")
        max_key_size = _size_bits(max_key_size, "max_key_size")
        if not min_key_size <= key_size <= max_key_size:
            raise ValueError(
                f"key sizes must satisfy min_key_size ({min_key_size}) <= key_size "
                f"({key_size}) <= max_key_size ({max_key_size})"
            )
        if max_key_count < 1 or max_key_per_request < 1:
            raise ValueError("max_key_count and max_key_per_request must be positive")
        self.key_size = key_size
        self.min_key_size = min_key_size
        self.max_key_size = max_key_size
        self.max_key_count = max_key_count
        self.max_key_per_request = max_key_per_request
        self.key_lifetime = key_lifetime
        self._pools: dict[tuple[SAEId, SAEId], KeyPool] = {}
        self._saes: set[SAEId] = set()
        #: (application, master, slave) → [keys, bits] handed out by this KME.
        self._usage: dict[tuple[str, SAEId, SAEId], list[int]] = {}

    def __repr__(self) -> str:
        return f"KME({self.kme_id!r}, pools={len(self._pools)}, saes={len(self._saes)})"

    # --- administration (called by the relay / network, never over the API) --------

    @property
    def saes(self) -> frozenset[SAEId]:
        """SAE IDs attached to this KME (allowed to call it)."""
        return frozenset(self._saes)

    def is_attached(self, sae_id: str) -> bool:
        """Return whether ``sae_id`` is attached to this KME (may call the API)."""
        return sae_id in self._saes

    def add_sae(self, sae_id: str) -> None:
        """Attach an SAE to this KME, so that it may call the API."""
        self._saes.add(validate_sae_id(sae_id))

    def add_pair(
        self,
        master: str,
        slave: str,
        role: PoolRole | str = PoolRole.LOCAL,
        *,
        peer_kme_id: str | None = None,
    ) -> None:
        """Create the (empty) pool for ``master`` → ``slave``; attach the local SAE(s).

        Args:
            master: the master SAE ID (the one that calls ``enc_keys``).
            slave: the slave SAE ID (the one that calls ``dec_keys``).
            role: which side(s) this KME serves (:class:`PoolRole` or its value).
            peer_kme_id: the KME hosting the other SAE (default: this KME).

        Raises:
            ValueError: bad IDs, ``master == slave``, or the pair exists with
                another role.
        """
        m, s = validate_sae_id(master, "master_SAE_ID"), validate_sae_id(slave, "slave_SAE_ID")
        if m == s:
            raise ValueError("master and slave SAE must differ")
        role = PoolRole(role)
        existing = self._pools.get((m, s))
        if existing is not None:
            if existing.role is not role:
                raise ValueError(f"pair {m}->{s} already has role {existing.role.value}")
            return
        peer = self.kme_id if peer_kme_id is None else validate_sae_id(peer_kme_id, "KME ID")
        self._pools[(m, s)] = KeyPool(m, s, role, peer)
        if role is not PoolRole.SLAVE:
            self._saes.add(m)
        if role is not PoolRole.MASTER:
            self._saes.add(s)

    def supply(
        self,
        master: str,
        slave: str,
        keys: Iterable[tuple[str, bytes]],
        *,
        role: PoolRole | str = PoolRole.LOCAL,
        peer_kme_id: str | None = None,
        now: float = 0.0,
    ) -> int:
        """Add keys to the pool of ``master`` → ``slave`` (created if needed).

        Keys beyond the pool's free room (``max_key_count``) are not stored;
        check :meth:`free` first to supply both KMEs of a pair identically,
        and supply them in the same order: keys that do not fill a whole
        supplied key are cut across consecutive ones (:mod:`qcall.qkd.keypool`).

        Args:
            master, slave, role, peer_kme_id: as for :meth:`add_pair`.
            keys: ``(key_ID, key)`` pairs; key_IDs are UUIDs, every key is
                exactly ``key_size`` bits.
            now: the current time, for :meth:`expire`.

        Returns:
            The number of keys stored (a prefix of ``keys``).

        Raises:
            ValueError: a bad key_ID, a key of the wrong size, or a key_ID
                already in this pool (nothing is stored then).
        """
        self.add_pair(master, slave, role, peer_kme_id=peer_kme_id)
        pool = self._pools[(SAEId(master), SAEId(slave))]
        nbytes = self.key_size // 8
        room = self.max_key_count * nbytes - pool.held_bytes()
        staged: dict[KeyId, bytearray] = {}
        for key_id, key in keys:
            kid = validate_key_id(key_id)
            if len(key) != nbytes:
                raise ValueError(f"key {kid} has {len(key) * 8} bits, pool needs {self.key_size}")
            if kid in staged or kid in pool:
                raise ValueError(f"key_ID {kid} is already in pool {master}->{slave}")
            staged[kid] = bytearray(key)
        stored = 0
        for kid, buf in staged.items():
            if room < nbytes:
                buf[:] = bytes(len(buf))
                continue
            pool.add(kid, buf, now)
            room -= nbytes
            stored += 1
        return stored

    def free(self, master: str, slave: str) -> int:
        """Return how many more keys of ``key_size`` bits the pool ``master`` → ``slave`` takes."""
        pool = self._pools.get((SAEId(master), SAEId(slave)))
        held = pool.held_bytes() if pool else 0
        return (self.max_key_count * (self.key_size // 8) - held) // (self.key_size // 8)

    def stored_key_count(self, master: str, slave: str) -> int:
        """Return Status ``stored_key_count``: keys of ``key_size`` bits this side can deliver."""
        pool = self._pools.get((SAEId(master), SAEId(slave)))
        return pool.stored_bytes() // (self.key_size // 8) if pool else 0

    def pairs(self) -> list[tuple[SAEId, SAEId, PoolRole]]:
        """Return every pool as ``(master, slave, role)``."""
        return [(p.master, p.slave, p.role) for p in self._pools.values()]

    def set_alarm(
        self, master: str, slave: str, alarm: str | None, *, qber: float | None = None
    ) -> None:
        """Set (or with ``alarm=None`` clear) the link alarm shown in Status.

        The relay calls this when a link on the route of ``master`` → ``slave``
        raises its eavesdropper alarm. Status then carries
        ``status_extension: {"alarm": alarm, "qber": qber}``. Keys already in
        the pool stay deliverable (they were distilled before the alarm).

        Raises:
            ValueError: the pair does not exist.
        """
        pool = self._pools.get((SAEId(master), SAEId(slave)))
        if pool is None:
            raise ValueError(f"no pool {master}->{slave}")
        pool.alarm = alarm
        pool.qber = qber if alarm is not None else None

    def withdraw(self, master: str, slave: str, key_ids: Iterable[str]) -> list[KeyId]:
        """Erase supplied keys that no SAE has received any byte of; return their IDs.

        The network calls this when a link the keys were relayed over raises an
        eavesdropper alarm or is cut, so that the pair's next key comes over
        another route. A key of which some bytes were handed out (a cut that
        reached into it) stays: its peer KME must still find it.
        """
        pool = self._pools.get((SAEId(master), SAEId(slave)))
        if pool is None:
            return []
        gone: list[KeyId] = []
        for key_id in key_ids:
            block = pool.blocks.get(KeyId(key_id))
            if block is not None and block.used == 0:
                pool.remove(block)
                gone.append(block.key_id)
        if gone:
            self._expired(pool, gone)  # durable KMEs journal it like an expiry
        return gone

    # --- key accounting (docs/etsi014.md, "Key accounting") ---------------------------

    def _count(self, application: str, master: SAEId, slave: SAEId, keys: KeyContainer) -> None:
        entry = self._usage.setdefault((application, master, slave), [0, 0])
        entry[0] += len(keys.keys)
        entry[1] += sum(8 * len(k.key) for k in keys.keys)

    def usage(self) -> list[dict[str, Any]]:
        """Key handed out by this KME since it started, per application and SAE pair.

        Returns:
            Rows ``{"application", "master", "slave", "keys", "bits"}``, sorted.
            The master's KME counts ``enc_keys``, the slave's ``dec_keys``; an
            untagged request counts as ``"untagged"``.
        """
        return [
            {"application": app, "master": m, "slave": s, "keys": keys, "bits": bits}
            for (app, m, s), (keys, bits) in sorted(self._usage.items())
        ]

    def expire(self, now: float) -> int:
        """Erase undelivered keys older than ``key_lifetime``; return how many.

        A supplied key is erased whole, even if some of its bytes went out.
        """
        if self.key_lifetime is None:
            return 0
        limit = now - self.key_lifetime
        erased = 0
        for pool in self._pools.values():
            gone = pool.expire(limit)
            if gone:
                self._expired(pool, gone)
                erased += len(gone)
        return erased

    def _expired(self, pool: KeyPool, key_ids: list[KeyId]) -> None:
        """Called after :meth:`expire` erased ``key_ids`` of ``pool`` (a hook for subclasses)."""

    # --- the ETSI GS QKD 014 methods (clause 5) -------------------------------------

    def _check_caller(self, caller: SAEId) -> None:
        if caller not in self._saes:
            raise KMEUnauthorizedError(
                "SAE is not registered at this KME",
                status=401,
                message="SAE is not registered at this KME",
            )

    def _peer(self, value: str, name: str) -> SAEId:
        try:
            return validate_sae_id(value, name)
        except ValueError as exc:
            raise bad_request(str(exc)) from None

    def status(self, caller: SAEId, slave: str) -> KeyStatus:
        """5.1 Get status: ``GET /api/v1/keys/{slave_SAE_ID}/status``.

        Answers for the pool ``caller`` → ``slave``; if there is none, for
        ``slave`` → ``caller`` (so a slave SAE can see its incoming pool).

        Raises:
            KMEUnauthorizedError: ``caller`` is not attached here.
            KMEBadRequestError: ``slave`` is not a known peer of ``caller``.
        """
        self._check_caller(caller)
        peer = self._peer(slave, "slave_SAE_ID")
        pool = self._pools.get((caller, peer)) or self._pools.get((peer, caller))
        if pool is None:
            raise bad_request(f"slave_SAE_ID {peer} is not known to this KME")
        source: str
        target: str
        if pool.role is PoolRole.SLAVE:
            source, target = pool.peer_kme_id, self.kme_id
        else:
            source, target = self.kme_id, pool.peer_kme_id
        extension: dict[str, Any] | None = None
        if pool.alarm is not None:
            extension = {"alarm": pool.alarm}
            if pool.qber is not None:
                extension["qber"] = pool.qber
        return KeyStatus(
            source_kme_id=source,
            target_kme_id=target,
            master_sae_id=pool.master,
            slave_sae_id=pool.slave,
            key_size=self.key_size,
            stored_key_count=pool.stored_bytes() // (self.key_size // 8),
            max_key_count=self.max_key_count,
            max_key_per_request=self.max_key_per_request,
            max_key_size=self.max_key_size,
            min_key_size=self.min_key_size,
            max_sae_id_count=0,
            status_extension=extension,
        )

    def enc_keys(
        self, caller: SAEId, slave: str, request: KeyRequest, now: float = 0.0
    ) -> KeyContainer:
        """5.2 Get key: ``POST|GET /api/v1/keys/{slave_SAE_ID}/enc_keys``.

        Delivers ``request.number`` keys of ``request.size`` bits (default
        ``key_size``) cut from the pool ``caller`` → ``slave``, oldest bytes
        first, and erases those bytes here (a ``local`` pool keeps the keys
        for the slave's ``dec_keys``).

        Raises:
            KMEUnauthorizedError: ``caller`` is not attached here.
            KMEBadRequestError: unknown ``slave``; ``number`` above
                ``max_key_per_request``; ``size`` not a multiple of 8 or outside
                ``min_key_size``..``max_key_size``; ``additional_slave_SAE_IDs``
                (``max_SAE_ID_count`` is 0); any ``extension_mandatory``.
            KMEUnavailableError: fewer than ``number * size`` bits stored (503).
        """
        self._check_caller(caller)
        peer = self._peer(slave, "slave_SAE_ID")
        pool = self._pools.get((caller, peer))
        if pool is None or pool.role is PoolRole.SLAVE:
            raise bad_request(f"slave_SAE_ID {peer} is not known to this KME")
        unsupported = {
            name
            for ext in request.extension_mandatory
            for name in ext
            if name != APPLICATION_EXTENSION
        }
        if unsupported:
            names = sorted(unsupported)
            raise bad_request(
                "not all extension_mandatory parameters are supported",
                [{"extension_mandatory_unsupported": names}],
            )
        if request.additional_slave_sae_ids:
            raise bad_request("additional_slave_SAE_IDs is not supported (max_SAE_ID_count is 0)")
        application = request_application(request)
        number = request.number
        if number < 1 or number > self.max_key_per_request:
            raise bad_request(
                f"number {number} is not in 1..{self.max_key_per_request} (max_key_per_request)"
            )
        size = self.key_size if request.size is None else request.size
        if size % 8:
            raise bad_request(f"size {size} is not a multiple of 8")
        if not self.min_key_size <= size <= self.max_key_size:
            raise bad_request(
                f"size {size} is not supported: min_key_size is {self.min_key_size}, "
                f"max_key_size is {self.max_key_size}"
            )
        stored = pool.stored_bytes() // (size // 8)
        if stored < number:
            what = "" if size == self.key_size else f" of {size} bits"
            text = f"not enough keys: {stored}{what} stored, {number} requested"
            raise KMEUnavailableError(text, status=503, message=text)
        issued = pool.issue(number, size // 8, now)
        container = KeyContainer(tuple(QKDKey(kid, key) for kid, key in issued))
        self._count(application, caller, peer, container)
        return container

    def dec_keys(
        self,
        caller: SAEId,
        master: str,
        key_ids: Sequence[KeyId],
        now: float = 0.0,
        *,
        application: str = UNTAGGED,
    ) -> KeyContainer:
        """5.3 Get key with key IDs: ``POST|GET /api/v1/keys/{master_SAE_ID}/dec_keys``.

        Delivers the keys with ``key_ids`` of the pool ``master`` → ``caller``
        and erases them. Only the slave SAE the keys were issued for can get
        them; to anyone else they do not exist. ``application`` (the Key IDs
        object's ``key_IDs_extension.qcall_application``) is counted in
        :meth:`usage`.

        Raises:
            KMEUnauthorizedError: ``caller`` is not attached here.
            KMEBadRequestError: unknown ``master``; too many key_IDs; a key_ID
                that is not (or no longer) in the pool (``details`` lists them).
        """
        self._check_caller(caller)
        peer = self._peer(master, "master_SAE_ID")
        pool = self._pools.get((peer, caller))
        if pool is None or pool.role is PoolRole.MASTER:
            raise bad_request(f"master_SAE_ID {peer} is not known to this KME")
        if not key_ids:
            raise bad_request("key_IDs is empty")
        if len(key_ids) > self.max_key_per_request:
            raise bad_request(
                f"{len(key_ids)} key_IDs requested, max_key_per_request is "
                f"{self.max_key_per_request}"
            )
        if len(set(key_ids)) != len(key_ids):
            raise bad_request("duplicate key_ID")
        if application != UNTAGGED:
            try:
                validate_application(application)
            except ValueError as exc:
                raise bad_request(str(exc)) from None
        keys, missing = pool.redeem(key_ids)
        if missing:
            raise bad_request("key_ID not found", [{"key_ID": k} for k in missing[:20]])
        container = KeyContainer(
            tuple(QKDKey(k, key) for k, key in zip(key_ids, keys, strict=True))
        )
        self._count(application, peer, caller, container)
        return container
