"""The phone's ML-DSA signer in a child process, so signing does not hold the event loop.

pyca/cryptography holds the GIL while it makes an ML-DSA signature (≈ 0.7–2 ms for
ML-DSA-65, heavy-tailed: FIPS 204 signing is a rejection loop), so a thread does not
help: ICE checks and DTLS records that arrive meanwhile wait (docs/performance.md,
"round 3"). The callee signs its ANSWER while the caller's DTLS flight is on its way,
so :class:`SigningWorker` makes that signature in a long-lived process of its own,
started with the phone (:class:`~qcall.call.phone.Phone`), and the event loop goes on
with ICE and DTLS on the other core (docs/performance.md, "round 5").

* **What crosses the pipe.** Once, at start, the identity key's 32-byte seed ξ
  (FIPS 204), so the worker can sign with the same key; then, per signature, the
  transcript hash and the ML-DSA context, and back the signature. Nothing else:
  no SDP, no QKD or ML-KEM secret, no session key.
* **The key is not logged or shown.** The worker writes nothing but its answers
  (its stderr goes to ``/dev/null``); errors come back as the exception's class
  name only, and :class:`SigningWorker`'s ``repr`` shows its process id and state.
* **It dies with the phone.** It exits at the end of its standard input: when the
  phone closes it (:meth:`SigningWorker.close`, which kills it if it lingers), or
  when the phone's process dies, whatever the cause. It ignores SIGINT (Ctrl-C
  reaches the whole process group; the phone decides).
* **Failure is loud and safe.** Before the worker said it is ready (its public key,
  checked against ours), or once it failed (died, answered an error, took longer
  than :data:`SIGN_TIMEOUT`), :func:`send_answer` signs in the event loop as before
  and logs a warning naming the cause. The signature is the same ML-DSA signature
  by the same key either way, so nothing about the call's security changes.

Wire format (both ways): frames of a 4-byte big-endian length and a body whose first
byte says what it is — ``K`` (alg name length, alg name, seed) once to the worker,
``R`` + public key back; ``S`` (context length, context, data) to the worker, ``s`` +
signature or ``e`` + error class name back, in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from qcall.call.crypto_child import LENGTH as _LENGTH, MAX_FRAME, frame as _frame
from qcall.children import module_argv
from qcall.exceptions import CryptoError
from qcall.handshake.callee import CalleeHandshake
from qcall.handshake.protocol import ANSWER_CONTEXT, State
from qcall.pqc import SigningKey

__all__ = ["SIGN_TIMEOUT", "SigningWorker", "send_answer"]

logger = logging.getLogger(__name__)

#: Seconds a closed worker may take to exit before it is killed.
CLOSE_GRACE = 0.5
#: Seconds a signature may take in the worker before it counts as failed (a signature
#: takes milliseconds; this only catches a stuck or starved process).
SIGN_TIMEOUT = 2.0


class SigningWorker:
    """A child process that signs with this phone's identity key; see the module docs.

    :meth:`launch` starts it (in the background); it is :attr:`ready` once it
    proved it holds our key. :meth:`sign` signs there. :meth:`close` ends it.
    """

    def __init__(self, signing_key: SigningKey) -> None:
        self._key = signing_key
        self._proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._ready = False
        #: Why the worker is not usable (``None`` while it starts or works).
        self.failed: str | None = None
        #: Signatures the worker made.
        self.signed = 0
        self._settled = asyncio.Event()  # ready, or failed

    def __repr__(self) -> str:
        state = "ready" if self.ready else (self.failed or "starting")
        return f"<SigningWorker pid={self.pid} {state}>"

    @property
    def pid(self) -> int | None:
        """The worker's process id (None before it started)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def ready(self) -> bool:
        """The worker runs and holds our key: :meth:`sign` will use it."""
        return self._ready and self.failed is None

    def launch(self) -> None:
        """Start the worker process in the background (idempotent)."""
        if self._starting is None and self.failed is None:
            self._starting = asyncio.ensure_future(self._start())

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait (at most ``timeout`` s) until the worker is ready or failed; :attr:`ready`."""
        self.launch()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout)
        return self.ready

    async def _start(self) -> None:
        if self.failed is not None:  # closed before it got to start
            return
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *module_argv("qcall.call.crypto_child"),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            self._fail(f"the crypto worker did not start ({type(exc).__name__})")
            return
        assert self._proc.stdin is not None
        alg = self._key.algorithm.value.encode("ascii")
        self._proc.stdin.write(_frame(b"K" + bytes([len(alg)]) + alg + self._key.seed_bytes()))
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while True:
                (length,) = _LENGTH.unpack(await stdout.readexactly(_LENGTH.size))
                if length > MAX_FRAME:
                    raise ValueError("frame too long")
                self._received(await stdout.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            self._fail(f"the crypto worker stopped ({type(exc).__name__})")

    def _received(self, body: bytes) -> None:
        kind, payload = body[:1], body[1:]
        if kind == b"R":
            if payload != self._key.public_bytes():
                raise ValueError("the worker holds another key")
            self._ready = True
            self._settled.set()
            logger.debug("= crypto worker %s ready", self._proc.pid if self._proc else "?")
        elif kind == b"e" and not self._ready:  # it could not load the key
            name = payload.decode("ascii", "replace")[:64]
            self._fail(f"the crypto worker could not load the identity key ({name})")
        elif kind in (b"s", b"e") and self._waiting:
            future = self._waiting.popleft()
            if future.done():  # timed out meanwhile
                return
            if kind == b"s":
                self.signed += 1
                future.set_result(payload)
            else:
                name = payload.decode("ascii", "replace")[:64]
                future.set_exception(CryptoError(f"the crypto worker could not sign ({name})"))
        else:
            raise ValueError("unexpected frame")

    async def sign(self, data: bytes, context: bytes) -> bytes:
        """ML-DSA signature of ``data`` with ``context``, made in the worker.

        Raises:
            CryptoError: the worker is not ready, failed, or took longer than
                :data:`SIGN_TIMEOUT` (then it is stopped, and not used again).
        """
        proc = self._proc
        if not self.ready or proc is None or proc.stdin is None:
            raise CryptoError(self.failed or "the crypto worker is not ready yet")
        if proc.returncode is not None or proc.stdin.is_closing():
            self._fail("the crypto worker exited")
            raise CryptoError("the crypto worker exited")
        if len(context) > 255:
            raise CryptoError("ML-DSA context must be at most 255 bytes")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        proc.stdin.write(_frame(b"S" + bytes([len(context)]) + context + data))
        try:
            return await asyncio.wait_for(asyncio.shield(future), SIGN_TIMEOUT)
        except TimeoutError:
            self._fail(f"the crypto worker took longer than {SIGN_TIMEOUT:g} s to sign")
            raise CryptoError(self.failed or "the crypto worker failed") from None

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            logger.warning("! %s", why)
        self._settled.set()
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(CryptoError(why))
                future.exception()  # retrieved: its caller may have given up
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def close(self) -> None:
        """End the worker (idempotent): close its input and wait; kill it if it lingers.

        A worker still starting (importing its backend) is killed at once: it holds
        nothing worth waiting for.
        """
        closed = self.failed or "the crypto worker was closed"
        was_ready, self.failed = self.ready, closed
        if self._starting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting  # a spawn is not cancelled half-way (no orphan)
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # its end of input: it exits
            try:
                if not was_ready:
                    raise TimeoutError
                await asyncio.wait_for(proc.wait(), CLOSE_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fail(closed)


async def send_answer(
    hs: CalleeHandshake,
    sdp: str,
    now: float,
    signer: SigningWorker | None,
    computing: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
) -> bool:
    """Callee: build, sign and queue the ANSWER, signed in ``signer`` when it is ready.

    ``computing`` wraps each step done in this process (the session's CPU-time
    account). Returns True when the worker made the signature. Without a ready
    worker, or when it fails (logged as a warning), the answer is signed here,
    exactly as :meth:`CalleeHandshake.send_answer` does.

    Raises:
        HandshakeError: the handshake failed while the worker signed (its error).
    """
    if signer is None or not signer.ready:
        with computing():
            hs.send_answer(sdp, now)
        return False
    with computing():
        digest = hs.prepare_answer(sdp, now)
    try:
        signature = await signer.sign(digest, ANSWER_CONTEXT)
        signed_there = True
    except CryptoError as exc:
        logger.warning("! %s: the answer is signed in the event loop instead", exc)
        with computing():
            signature = hs.identity.sign(digest, ANSWER_CONTEXT)
        signed_there = False
    if hs.error is not None:  # failed while we waited (a timer, the peer's error)
        raise hs.error
    if hs.state is not State.CALLEE_EXPECT_ANSWER_SDP:
        return signed_there
    with computing():
        hs.send_signed_answer(signature)
    return signed_there
