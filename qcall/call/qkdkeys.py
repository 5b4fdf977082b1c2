"""How a call gets its QKD keys: ETSI GS QKD 014 ``enc_keys`` / ``dec_keys`` when needed.

A part of :class:`~qcall.call.session.CallSession` (its ``qkd`` attribute), kept
apart so each module stays small. The caller takes the key for its offer from
the phone's reservoir of prefetched keys (:mod:`qcall.qkd.reservoir`,
docs/qkd-keys.md) or else fetches it once the invite left (docs/calls.md), and
fetches one per rekey; the callee fetches keys by
key_ID when the handshake asks (:class:`~qcall.handshake.QKDKeysNeeded`). Without
a fresh key for a rekey, the call keeps its current keys for ``key_grace``
seconds, says so, and then ends cleanly — on both sides: a callee whose KME
fails answers the rekey with REKEY_NACK and the caller retries with a fresh
key (``docs/faults.md``, ``docs/handshake.md`` §3.7).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from qcall.exceptions import LinkAlarmError, QKDError, SecurityPolicyError
from qcall.handshake import CalleeHandshake, CallerHandshake, QKDKeysNeeded, RekeyPostponed
from qcall.handshake.kem import KEMPool
from qcall.qkd.client import KeySource
from qcall.qkd.etsi014 import KeyStatus, QKDKey
from qcall.qkd.reservoir import KeyReservoir

if TYPE_CHECKING:
    from qcall.call.session_pump import HandshakePump

__all__ = ["QKDKeys"]

T = TypeVar("T")

logger = logging.getLogger("qcall.call.session")

_ALARM_LINK = re.compile(r"\bon link ([^\s;,]+)")


def _alarm_link(alarm: str) -> str | None:
    """The link named by a KME alarm text ("eavesdropper alarm on link X; …")."""
    match = _ALARM_LINK.search(alarm)
    return match.group(1) if match else None


#: The source KME ID of each key source, from its last Status: the offer names it.
#: Later calls take it from here and ask for the Status once the call is confirmed.
_KME_IDS: weakref.WeakKeyDictionary[KeySource, str] = weakref.WeakKeyDictionary()

#: How long each key source's last ``enc_keys`` took (ms).
_FETCH_MS: weakref.WeakKeyDictionary[KeySource, float] = weakref.WeakKeyDictionary()

#: A KME slower than this (ms, last fetch) is asked for the key as the call is dialled.
SLOW_KME_MS = 10.0


async def _result(request: Awaitable[T]) -> T | QKDError:
    """``await request``, a QKDError returned rather than raised."""
    try:
        return await request
    except QKDError as error:
        return error


def _once(action: Callable[[], object]) -> Callable[[], None]:
    """``action`` wrapped so that only its first call runs."""
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return run


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)


class QKDKeys:
    """QKD key fetching for one :class:`~qcall.call.session.CallSession`."""

    def __init__(self, session: HandshakePump) -> None:
        self.session = session
        self.failing_since: float | None = None
        #: The caller's key came without a Status: :meth:`check_status` is due.
        self.status_due = False
        #: The phone's prefetched QKD keys (docs/qkd-keys.md), or None: fetch at dial.
        self.reservoir: KeyReservoir | None = None
        #: The phone's pre-made ML-KEM key pairs, or None: made when the offer is signed.
        self.kem_pool: KEMPool | None = None

    def fetch_early(self) -> bool:
        """Caller: ask for the key as we dial, rather than once ICE checks run?

        Early when this key source's speed is unknown (its first call) or its last
        ``enc_keys`` took more than :data:`SLOW_KME_MS`: its latency then hides
        behind the invite. A fast KME is asked later, so that its request does not
        compete with the call's signaling for the CPU (docs/calls.md).
        """
        source = self.session.key_source
        if source is None:
            return False
        last = _FETCH_MS.get(source)  # set with (or after) the KME ID: known ⇒ seen before
        return last is None or last > SLOW_KME_MS

    def _source(self) -> KeySource:
        if self.session.key_source is None:
            raise QKDError("no QKD key source is configured")
        return self.session.key_source

    async def fetch_initial_key(self) -> tuple[list[Any], str]:
        """Caller: ETSI 014 ``enc_keys`` (and ``status``) for the callee's SAE.

        The offer names our KME (``source_KME_ID`` of the Status). The first call
        through a key source asks for the Status and the key concurrently; later
        calls reuse the ID (and may take a prefetched key) and ask for the Status
        once the call is confirmed (:meth:`check_status_after_setup`), or at once
        when no key came (to say why).

        A link alarm in the Status (``status_extension``, set by a trusted-node
        network, ``docs/relay.md``) is acted on here (``docs/threat-model.md``):

        * no key delivered and an alarm: the route to the callee is broken by a
          suspected eavesdropper; the call is refused with a
          :class:`~qcall.exceptions.LinkAlarmError` naming the link (or goes
          ``pqc`` only when the user allowed it, saying why);
        * a key delivered despite an alarm: either the relay rerouted around the
          link, or the key was relayed *before* the alarm. Such a key is not
          compromised (it was distilled from blocks that passed parameter
          estimation, and privacy amplification removed what an eavesdropper
          could know of them), so the call proceeds, and the status notice shows
          the alarm.

        Returns:
            The keys and the policy: ``hybrid``, or ``pqc`` only when the user
            allowed it (and the status says why).

        Raises:
            LinkAlarmError: no QKD key because of a link alarm, ``pqc`` not allowed.
            SecurityPolicyError: no QKD key, and ``pqc`` was not allowed.
        """
        s = self.session
        started = time.monotonic()
        status: KeyStatus | BaseException
        key: QKDKey | BaseException
        try:
            source = self._source()
            kme_id = _KME_IDS.get(source)
            held = self._take_prefetched(kme_id)
            if held is not None:  # no KME round trip on the set-up path
                return [held], "hybrid"
            if kme_id is None:  # the first call through this source: the offer needs the ID
                status, key = await asyncio.gather(
                    source.status(s.peer_sae),
                    source.get_key(s.peer_sae, application="call-setup"),
                    return_exceptions=True,
                )
            else:
                key = await _result(source.get_key(s.peer_sae, application="call-setup"))
                if isinstance(key, QKDKey):  # the Status only for its alarm: during ICE
                    s.qkd_kme_id = kme_id
                    self.status_due = True
                    s.status.timings_ms["qkd_fetch"] = _FETCH_MS[source] = _ms_since(started)
                    self._refill_after_setup()
                    return [key], "hybrid"
                status = await _result(source.status(s.peer_sae))  # why no key?
        except QKDError as error:
            status = key = error
        for result in (status, key):
            if isinstance(result, BaseException) and not isinstance(result, QKDError):
                raise result
        if isinstance(status, BaseException) or isinstance(key, BaseException):
            failure = key if isinstance(key, QKDError) else status
            assert isinstance(failure, QKDError)
            if not isinstance(status, BaseException) and status.alarm is not None:
                failure = LinkAlarmError(
                    f"no QKD key for {s.peer}: {status.alarm}",
                    link=_alarm_link(status.alarm),
                    qber=status.qber,
                )
            if not s.options.allow_pqc_only:
                advice = (
                    "the call was not placed. "
                    "Use --allow-pqc-only to accept an ML-KEM-only (pqc) call."
                )
                if isinstance(failure, LinkAlarmError):
                    raise LinkAlarmError(
                        f"{failure}; {advice}", link=failure.link, qber=failure.qber
                    )
                raise SecurityPolicyError(f"QKD key unavailable ({failure}); {advice}") from failure
            s.status.notice = f"QKD unavailable ({failure}): pqc only, as allowed"
            logger.warning("! %s", s.status.notice)
            return [], "pqc"
        _KME_IDS[source] = status.source_kme_id
        self._show_alarm(status)
        s.qkd_kme_id = status.source_kme_id
        s.status.timings_ms["qkd_fetch"] = _FETCH_MS[source] = _ms_since(started)
        self._refill_after_setup()
        return [key], "hybrid"

    def _take_prefetched(self, kme_id: str | None) -> QKDKey | None:
        """Caller: a key from the phone's reservoir (used once), if it holds one.

        Only once our KME's ID is known (the offer names it): the reservoir is
        filled after a call's own fetch, which learnt it. The Status (for a link
        alarm) then follows during ICE, as for any key fetched without one.
        """
        s = self.session
        if self.reservoir is None or kme_id is None:
            return None
        key = self.reservoir.take(s.peer_sae)
        if key is None:
            return None
        s.qkd_kme_id = kme_id
        self.status_due = True
        s.status.timings_ms["qkd_fetch"] = 0.0
        s.status.timings_ms["qkd_prefetched"] = 1.0
        self._refill_after_setup()
        return key

    def _refill_after_setup(self) -> None:
        """Top the reservoir (and the ML-KEM pairs) up once this call is up or over.

        Never during the set-up: the refill's KME request and key generation
        would compete with ICE and DTLS for the event loop.
        """
        s = self.session
        if self.reservoir is not None:
            self.reservoir.refill_after(s.peer_sae, s._confirmed0, s._ended)
        pool = self.kem_pool
        if pool is not None and pool.size:
            fill_once = _once(pool.fill)
            for event in (s._confirmed0, s._ended):
                event.add_done_callback(lambda _: fill_once())

    def check_status_after_setup(self) -> None:
        """Caller: :meth:`check_status` once the call is confirmed (not during ICE and DTLS).

        Its KME request would share the event loop with the connectivity checks and
        the DTLS handshake; only a notice (and the reservoir's alarm rule) wait for it.
        """
        s = self.session

        async def later() -> None:
            waiting: set[asyncio.Future[None]] = {s._confirmed0, s._ended}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not s._ended.done():
                await self.check_status()

        s._spawn(later())

    async def check_status(self) -> None:
        """Caller: the Status of a call whose key came without one (its alarm, if any).

        A key that was delivered is used whatever the Status says (see
        :meth:`fetch_initial_key`), so only the notice waits for it.
        """
        self.status_due = False
        s = self.session
        try:
            status = await self._source().status(s.peer_sae)
        except QKDError as exc:
            logger.debug("! KME status during ICE failed: %s", exc)
            return
        _KME_IDS[self._source()] = status.source_kme_id
        self._show_alarm(status)

    def _show_alarm(self, status: KeyStatus) -> None:
        s = self.session
        if self.reservoir is not None:  # keys held from before an alarm: never used
            if status.alarm is not None:
                self.reservoir.suspend(s.peer_sae)
            else:
                self.reservoir.resume(s.peer_sae)
        if status.alarm is not None:
            if "rerouted" in status.alarm:
                s.status.notice = f"QKD {status.alarm}: this call's key took the new route"
            else:
                s.status.notice = (
                    f"QKD {status.alarm}: this call uses a key relayed before the alarm; "
                    "it ends when no fresh key arrives"
                )
            logger.warning("! %s", s.status.notice)

    async def fetch_keys_by_id(self, event: QKDKeysNeeded) -> None:
        """Callee: ETSI 014 ``dec_keys`` from our KME for the caller's key_IDs."""
        s = self.session
        assert s.hs is not None
        started = time.monotonic()
        try:
            keys = await self._source().get_keys_by_id(
                event.master_sae_id,
                event.key_ids,
                application="call-setup" if event.epoch == 0 else "rekey",
            )
        except QKDError as exc:
            if event.epoch > 0 and isinstance(s.hs, CalleeHandshake):
                self._decline(s.hs, event.epoch, exc)  # keep the current keys, if in grace
            else:
                s.hs.fail(exc)
            await s.apply_events()
            return
        if event.epoch == 0:
            s.status.timings_ms["qkd_fetch"] = _ms_since(started)
            s.note_keys(list(event.key_ids))
        s.hs.receive_qkd_keys(keys)
        await s.apply_events()

    async def rekey(self, epoch: int) -> None:
        """Caller: fetch a fresh QKD key and start epoch ``epoch``."""
        s = self.session
        hs = s.hs
        assert isinstance(hs, CallerHandshake)
        keys: list[Any] = []
        if hs.policy in ("hybrid", "otp"):
            try:
                keys = [await self._source().get_key(s.peer_sae, application="rekey")]
            except QKDError as exc:
                # The keys held for our next call to this peer serve this call first:
                # a prefetch never leaves a running call without its rekey.
                held = self.reservoir.take(s.peer_sae) if self.reservoir is not None else None
                if held is None:
                    self._key_missing(hs, epoch, exc)
                    return
                logger.info("= rekey %d: %s; a prefetched key instead", epoch, exc)
                keys = [held]
        hs.rekey(s.clock(), keys, fresh_kem=s.options.fresh_kem_on_rekey)
        await s.apply_events()

    def rekey_postponed(self, event: RekeyPostponed) -> None:
        """Caller: the callee answered REKEY_NACK (its KME failed): retry, within the grace."""
        hs = self.session.hs
        if event.remote and isinstance(hs, CallerHandshake):
            error = QKDError(f"{self.session.peer}'s KME could not deliver the key ({event.code})")
            self._key_missing(hs, event.epoch, error)

    def rekey_completed(self) -> None:
        """Both sides: a rekey went through, so the grace period (if running) is over."""
        if self.failing_since is not None:
            self.failing_since = None
            self.session.status.notice = "fresh QKD keys again"

    def _grace_left(self, exc: QKDError) -> float:
        """Count one failed rekey; return the seconds of grace left (≤ 0: over)."""
        s = self.session
        now = time.monotonic()
        s.status.rekey_failures += 1
        if self.failing_since is None:
            self.failing_since = now
        left = s.options.key_grace - (now - self.failing_since)
        if left <= 0:
            s.status.notice = f"no fresh QKD key for {now - self.failing_since:.0f} s ({exc})"
        return left

    def _decline(self, hs: CalleeHandshake, epoch: int, exc: QKDError) -> None:
        """Callee: our KME failed during a rekey: REKEY_NACK within the grace, else end."""
        s = self.session
        left = self._grace_left(exc)
        if left <= 0:
            hs.fail(
                QKDError(
                    f"our KME could not deliver a QKD key for longer than the "
                    f"{s.options.key_grace:g} s grace period ({exc}); the call was ended"
                )
            )
            return
        s.status.notice = (
            f"rekey {epoch} postponed: {exc}; keeping the current keys for up to {left:.0f} s"
        )
        logger.warning("! %s", s.status.notice)
        hs.decline_rekey(exc)

    def _key_missing(self, hs: CallerHandshake, epoch: int, exc: QKDError) -> None:
        """Keep the current keys during the grace period, retrying; then end the call."""
        s = self.session
        left = self._grace_left(exc)
        assert self.failing_since is not None
        waited = time.monotonic() - self.failing_since
        if left <= 0:
            s.end_with_error(
                QKDError(
                    f"no fresh QKD key for {waited:.0f} s, longer than the "
                    f"{s.options.key_grace:g} s grace period ({exc}); the call was ended"
                ),
                "qkd_unavailable",
            )
            return
        s.status.notice = (
            f"rekey {epoch} postponed: {exc}; keeping the current keys for up to {left:.0f} s"
        )
        logger.warning("! %s", s.status.notice)
        hs.postpone_rekey(s.clock(), min(s.options.rekey_retry, left))
        s.timer_changed()
