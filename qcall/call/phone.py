"""A user's phone: one signaling connection, one identity, one QKD key source, its calls.

:class:`Phone` registers with the signaling server, routes each call message
to its :class:`~qcall.call.session.CallSession` by ``call_id``, answers
incoming invitations (automatically, or through a callback) and answers
``busy`` when a call is already running. It is what ``qcall call`` and
``qcall listen`` run, and what the tests drive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from aiortc import MediaStreamTrack

from qcall._aio import AsyncService
from qcall.call.crypto_worker import SigningWorker
from qcall.call.prepared import PreparedConnections, PrepareSpec
from qcall.call.session import CallOptions, CallSession, CallState
from qcall.exceptions import CallError, SignalingError
from qcall.handshake import ReplayCache
from qcall.handshake.kem import KEMPool
from qcall.handshake.protocol import CheckPeer
from qcall.pqc import SigningKey
from qcall.qkd.client import KeySource
from qcall.qkd.reservoir import KeyReservoir, ReservoirConfig
from qcall.signaling.client import Disconnected, SignalingClient, new_call_id
from qcall.signaling.messages import EARLY_OFFER, CallMessage, ErrorMessage, Invite

__all__ = ["Phone"]

logger = logging.getLogger(__name__)

#: Seconds :meth:`Phone.start` waits for its crypto worker to be ready.
WORKER_START_WAIT = 2.0

#: ``decide(invite) -> bool``: pick up (True) or reject (False).
Decide = Callable[[Invite], Awaitable[bool]]


class Phone(AsyncService):
    """A registered user who can place and answer calls.

    Args:
        url: the signaling server (``ws://`` or ``wss://``).
        signing_key: the user's ML-DSA-65 identity key.
        name: the user's name.
        check_peer: the contacts hook (``ContactStore.check_peer``).
        peer_trust: how a peer was trusted, for display (``ContactStore.peer_trust``).
        key_source: QKD key source, or ``None``.
        options: defaults for every call.
        make_source: builds the audio track to send for a new call.
        on_track: receives the remote audio track of a call.
        watch: follow the presence of these names only (e.g. the contacts); ``None``
            follows everyone (docs/signaling.md, "Presence").
        previous_key: the user's previous identity key, to move the name to the new
            one on the server (docs/signaling.md, "Moving a name").
        prefetch: QKD keys prefetched per peer for the calls we place
            (docs/qkd-keys.md); ``ReservoirConfig(keys_per_peer=0)`` turns it off.
        kem_pool: ML-KEM key pairs made ahead for our offers and rekeys (0: none).
        prepare: keep a peer connection made ahead to place and one to answer the
            next call (:mod:`qcall.call.prepared`; each used for one call only).
        crypto_worker: sign our handshake answers in a child process started with the
            phone (:mod:`qcall.call.crypto_worker`), not in the event loop. Off by
            default: on the loaded 2-core test machine it made set-up slower
            (docs/performance.md, "round 5 (loopback)").
    """

    def __init__(
        self,
        url: str,
        signing_key: SigningKey,
        name: str,
        *,
        check_peer: CheckPeer,
        key_source: KeySource | None,
        options: CallOptions | None = None,
        make_source: Callable[[], MediaStreamTrack | None] = lambda: None,
        on_track: Callable[[CallSession, MediaStreamTrack], None] | None = None,
        ssl: object | None = None,
        watch: Iterable[str] | None = None,
        peer_trust: Callable[[str], str | None] | None = None,
        previous_key: SigningKey | None = None,
        prefetch: ReservoirConfig | None = None,
        kem_pool: int = 2,
        prepare: bool = True,
        crypto_worker: bool = False,
    ) -> None:
        self.name = name
        self.signing_key = signing_key
        self.check_peer = check_peer
        self.peer_trust = peer_trust
        self.key_source = key_source
        self.options = options or CallOptions()
        self.make_source = make_source
        self.on_track = on_track
        self.signaling = SignalingClient(
            url,
            signing_key,
            name,
            ssl,  # type: ignore[arg-type]
            watch=watch,
            previous_key=previous_key,
            # the caller's signed offer while ringing: verified before the pick-up
            features=(EARLY_OFFER,) if self.options.early_offer else (),
        )
        self.calls: dict[str, CallSession] = {}
        self.replay_cache = ReplayCache()
        #: Prefetched QKD keys (None without a key source).
        self.reservoir = (
            KeyReservoir(key_source, prefetch or ReservoirConfig()) if key_source else None
        )
        self.kem_pool = KEMPool(size=kem_pool)
        #: Peer connections made ahead, one per role (None: each call makes its own).
        self.prepared = PreparedConnections() if prepare else None
        self._sends_audio = True  # learnt from the last call: its source, or none
        #: Our ML-DSA signer process; None when ``crypto_worker`` is off.
        self.signer = SigningWorker(signing_key) if crypto_worker else None
        self._incoming: asyncio.Queue[CallSession] = asyncio.Queue()
        self._router: asyncio.Task[None] | None = None
        self._decide: Decide | None = None
        self._auto_answer = False  # incoming(): calls are answered as they come

    async def start(self) -> None:
        """Connect and register.

        Raises:
            SignalingError: the server is unreachable or refused the registration.
        """
        if self.signer is not None:
            self.signer.launch()  # starts while we connect
        try:
            await self.signaling.connect()
        except BaseException:
            if self.signer is not None:  # no close() follows a failed start
                await self.signer.close()
            raise
        self._router = asyncio.ensure_future(self._route())
        self.kem_pool.fill()
        self._keep_prepared()
        if self.signer is not None:
            # Ready in ≈ 0.1–0.3 s (a Python process importing its backend): its start
            # should not compete with a first call for the CPU. Not ready in time (or
            # failed, logged): answers are signed in the event loop until it is.
            await self.signer.wait_ready(WORKER_START_WAIT)

    async def close(self) -> None:
        """Hang up every call and disconnect."""
        for session in list(self.calls.values()):
            await session.hangup()
        if self._router is not None:
            self._router.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._router
        await self.signaling.close()
        self.kem_pool.clear()
        if self.prepared is not None:
            await self.prepared.close()
        if self.signer is not None:
            await self.signer.close()
        if self.reservoir is not None:
            await self.reservoir.close()  # wipes the held keys
        if self.key_source is not None:
            await self.key_source.close()

    def _options_with_turn(self) -> CallOptions:
        """The call options, plus the TURN server the signaling server gave us, if any.

        Its credentials are short-lived (docs/signaling.md, "TURN credentials"): the
        ones of the latest registration are used.
        """
        turn = self.signaling.turn
        if turn is None:
            return self.options
        servers = [*self.options.ice_servers, turn.ice_server()]
        return dataclasses.replace(self.options, ice_servers=servers)

    def _session(self, call_id: str, peer: str, role: str) -> CallSession:
        on_track = self.on_track

        def track_arrived(track: MediaStreamTrack) -> None:
            if on_track is not None:
                on_track(session, track)

        session = CallSession(
            signaling=self.signaling,
            signing_key=self.signing_key,
            name=self.name,
            call_id=call_id,
            peer=peer,
            role=role,
            check_peer=self.check_peer,
            key_source=self.key_source,
            options=self._options_with_turn(),
            source=self.make_source(),
            on_track=track_arrived,
            replay_cache=self.replay_cache,
            peer_trust=self.peer_trust,
        )
        if role == "caller":  # the keys for the calls we place
            session.qkd.reservoir = self.reservoir
            session.qkd.kem_pool = self.kem_pool
        session.prepared = self.prepared
        self._sends_audio = session.source is not None
        session.signer = self.signer
        self.calls[call_id] = session

        def ended(_: object) -> None:
            self.calls.pop(call_id, None)
            self._keep_prepared()  # the next ones, once this call no longer sets up

        session.ended.add_done_callback(ended)
        return session

    def _keep_prepared(self) -> None:
        """Have a peer connection made ahead for the next call of each role, if none is."""
        if self.prepared is None:
            return
        options = self._options_with_turn()
        if options.ice_policy != "all":  # relay: made per call (TURN credentials change)
            return
        control = options.policy != "plain"  # plain: the harness's baseline, no channel
        for role in ("caller", "callee"):
            spec = PrepareSpec.for_call(role, options, self._sends_audio, control=control)
            self.prepared.keep(spec, options)

    async def call(self, peer: str) -> CallSession:
        """Place a call to ``peer`` and return it once media flows.

        Raises:
            CallRejectedError, SecurityPolicyError, HandshakeError, QKDError, CallError.
        """
        session = self.new_call(peer)
        await session.dial()
        return session

    def new_call(self, peer: str) -> CallSession:
        """A call to ``peer``, not dialled yet: ``await session.dial()`` places it.

        For a user interface that shows (and can hang up) the call while it rings.
        """
        return self._session(new_call_id(), peer, "caller")

    async def ringing(self) -> CallSession:
        """Wait for the next incoming call and return it unanswered, while it rings.

        ``await session.answer()`` picks it up; :meth:`decline` declines it. If
        the caller gives up first, ``session.ended`` resolves: a missed call (it
        may already be done when this returns). Do not mix with :meth:`incoming`.
        """
        self._decide = None
        self._auto_answer = False
        return await self._incoming.get()

    async def decline(self, session: CallSession, reason: str = "declined") -> None:
        """Decline a call returned by :meth:`ringing` that was not answered."""
        with contextlib.suppress(SignalingError):
            await self.signaling.reject(session.call_id, reason)
        session._finish(None)
        await session.hangup()  # already ended: only releases what the session holds

    async def incoming(self, decide: Decide | None = None) -> CallSession:
        """Wait for the next incoming call, answer it and return it once media flows.

        Args:
            decide: asked for each invitation; ``None`` answers every call.

        Raises:
            HandshakeError, QKDError, CallError: that call failed (the phone keeps
            listening; call again for the next one).
        """
        self._decide = decide
        self._auto_answer = True
        while True:
            session = await self._incoming.get()
            if session.refused is not None:  # its signed offer was refused while queued
                raise session.refused
            if not session.ended.done():  # skip calls the caller gave up on meanwhile
                break
        await session.answer()
        return session

    async def _route(self) -> None:
        async for event in self.signaling:
            try:
                await self._dispatch(event)
            except Exception as exc:  # never let one bad message stop the phone
                logger.warning("! signaling event %s not handled: %s", type(event).__name__, exc)

    async def _dispatch(self, event: object) -> None:
        if isinstance(event, Disconnected):
            if event.final:
                for pending in list(self.calls.values()):
                    if pending.status.state < CallState.ACTIVE:
                        pending.handle_signaling(
                            ErrorMessage("unavailable", f"signaling lost: {event.reason}")
                        )
            return
        if isinstance(event, Invite):
            await self._invited(event)
            return
        if isinstance(event, ErrorMessage) and event.call_id is None:
            logger.warning("! signaling server: %s (%s)", event.message, event.code)
            return
        call_id = getattr(event, "call_id", None)
        session = self.calls.get(call_id) if isinstance(call_id, str) else None
        if session is not None and isinstance(event, CallMessage | ErrorMessage):
            session.handle_signaling(event)

    async def _invited(self, invite: Invite) -> None:
        arrived = time.monotonic()  # how old the offer it may carry is, at the pick-up
        peer = invite.peer or "?"
        if self.calls:
            with contextlib.suppress(SignalingError):
                await self.signaling.busy(invite.call_id, "in another call")
            return
        with contextlib.suppress(SignalingError):
            await self.signaling.ringing(invite.call_id)
        if self._decide is not None and not await self._decide(invite):
            with contextlib.suppress(SignalingError):
                await self.signaling.reject(invite.call_id, "declined")
            return
        session = self._session(invite.call_id, peer, "callee")
        # Answered at once: the signed offer is verified right after the accept; else
        # (ringing()) as soon as it comes, while the phone rings.
        session.auto_answer = self._auto_answer
        if invite.payload is not None:  # the caller's offer rode the invite
            session.offered(invite.payload, arrived)
        self._incoming.put_nowait(session)

    def active_call(self) -> CallSession:
        """The one call in progress.

        Raises:
            CallError: there is none.
        """
        for session in self.calls.values():
            return session
        raise CallError("no call in progress")
