"""Key hygiene over the whole test suite: a pytest plugin (loaded by ``tests/conftest.py``).

What it does, for every test of the run (``docs/threat-model.md``, "Key hygiene"):

1. **Registers every secret** qcall creates, by wrapping the few places that
   make secret bytes: for *every* backend named in :data:`qcall.pqc.BACKENDS`
   (so a new backend is covered by being listed there), the secret parts of
   each ML-DSA and ML-KEM private key it makes (``secret_parts()``, part of
   the backend interface), the seeds keys are made from, and ML-KEM shared
   secrets (encapsulation and decapsulation); QKD keys (every ETSI 014
   ``QKDKey``, every key a KME is supplied with: relay deliveries, key files,
   test pools), SRTP master keys and salts, the handshake secret and the epoch
   secrets (:class:`KeySchedule`, :class:`~qcall.call.srtpcore.SRTPKeys`), and
   the DTLS exporter secret.
2. **Captures every text** the run produces where a key could leak: every log
   record of every logger at DEBUG (message and formatted traceback, taken in
   ``Logger.handle`` so that no test's handler setup can hide it; only the
   per-packet loggers of aiortc/aioice stay at INFO, see
   :data:`PER_PACKET_LOGGERS`), the
   arguments of every :class:`~qcall.exceptions.QCallError` raised or not,
   and the ``repr``/``str`` of every key-holding object and handshake event.
   A hook that fails (a key whose secrets cannot be read) is itself a
   finding: a secret not registered is a leak that would go unseen.
3. **Scans** those texts after each test for every registered secret as hex
   (either case), base64 (standard or URL-safe, in all three alignments, so a
   key inside a longer blob is found too) and Python ``bytes`` literals, using
   12-byte windows at the start and end of each secret. A hit records the test,
   the kind of secret, its encoding and where it appeared; never the secret.
4. Records the files written for secrets (``atomic_write`` with its private
   default mode, the keylog, WAV recordings, key files) and which files tests
   ``chmod`` on purpose.

``tests/test_hygiene.py`` runs last and fails loudly on any finding; if it
was not part of the run, the session fails at its end instead.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import functools
import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

#: Bytes per search window: 96 bits, so a chance match is impossible in practice.
WINDOW = 12
_HEX_RUN = re.compile(rf"[0-9a-fA-F]{{{2 * WINDOW},}}")
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{12,}")
_BYTES_LITERAL = re.compile(
    rf"""b'(?:[^'\\\n]|\\.){{{WINDOW},}}'|b"(?:[^"\\\n]|\\.){{{WINDOW},}}\""""
)
_REDACT = re.compile(r"[A-Za-z0-9+/_=-]{12,}")
_TESTS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Finding:
    """A secret seen where it must not be (the secret itself is never kept here)."""

    test: str
    kind: str
    encoding: str
    where: str

    def __str__(self) -> str:
        return f"{self.test}: {self.kind} as {self.encoding} in {self.where}"


@dataclass(repr=False)  # the needles are secrets
class Hygiene:
    """The registry of secrets, the captured texts, and the findings of one run."""

    hex_needles: dict[str, str] = field(default_factory=dict)
    b64_needles: dict[str, str] = field(default_factory=dict)
    raw_needles: dict[bytes, str] = field(default_factory=dict)
    secrets: int = 0
    texts: list[tuple[str, str]] = field(default_factory=list)
    scanned_texts: int = 0
    scan_seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    private_files: dict[Path, str] = field(default_factory=dict)
    chmodded: set[Path] = field(default_factory=set)
    current: str = "<session>"
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __repr__(self) -> str:
        return f"<Hygiene {self.secrets} secrets, {len(self.findings)} findings>"

    # --- secrets ------------------------------------------------------------------------

    def register(self, kind: str, secret: object) -> None:
        """Remember ``secret`` (bytes) as a value that must never appear in a text."""
        if not isinstance(secret, bytes | bytearray | memoryview):
            return
        data = bytes(secret)
        if len(data) < WINDOW or data.count(data[:1]) == len(data):  # skip b"\0" * n
            return
        windows = {data[:WINDOW], data[-WINDOW:]}
        if data[:WINDOW] in self.raw_needles:
            return
        with self._lock:
            self.secrets += 1
            for w in windows:
                self.raw_needles[w] = kind
                self.hex_needles[w.hex()] = kind
            # base64 of a window starting at each alignment mod 3 (a secret inside
            # a longer blob is encoded starting at one of them).
            for start in (0, 1, 2, len(data) - WINDOW, len(data) - WINDOW + 1):
                chunk = data[start : start + 9]
                if start >= 0 and len(chunk) == 9:
                    std = base64.b64encode(chunk).decode("ascii")
                    self.b64_needles[std] = kind
                    self.b64_needles[std.replace("+", "-").replace("/", "_")] = kind

    # --- texts --------------------------------------------------------------------------

    def capture(self, where: str, text: str) -> None:
        """Keep ``text`` (from ``where``) for the scan at the end of the current test."""
        self.texts.append((where, text))

    def scan_pending(self) -> list[Finding]:
        """Scan the texts captured since the last scan; record and return the findings."""
        started = time.perf_counter()
        texts, self.texts = self.texts, []
        found: list[Finding] = []
        seen: set[tuple[str, str, str]] = set()
        for where, text in texts:
            for kind, encoding in self._search(text):
                if (kind, encoding, where) not in seen:
                    seen.add((kind, encoding, where))
                    found.append(Finding(self.current, kind, encoding, where))
        self.scanned_texts += len(texts)
        self.findings.extend(found)
        self.scan_seconds += time.perf_counter() - started
        return found

    def _search(self, text: str) -> Iterator[tuple[str, str]]:
        hex_needles, b64_needles, raw_needles = self.hex_needles, self.b64_needles, self.raw_needles
        n = 2 * WINDOW
        for match in _HEX_RUN.finditer(text):
            run = match.group().lower()
            for i in range(len(run) - n + 1):
                kind = hex_needles.get(run[i : i + n])
                if kind is not None:
                    yield kind, "hex"
                    break
        for match in _B64_RUN.finditer(text):
            run = match.group()
            for i in range(len(run) - 11):
                kind = b64_needles.get(run[i : i + 12])
                if kind is not None:
                    yield kind, "base64"
                    break
        if "b'" in text or 'b"' in text:
            for match in _BYTES_LITERAL.finditer(text):
                try:
                    value = ast.literal_eval(match.group())
                except (ValueError, SyntaxError):
                    continue
                for i in range(len(value) - WINDOW + 1):
                    kind = raw_needles.get(value[i : i + WINDOW])
                    if kind is not None:
                        yield kind, "a bytes repr"
                        break


STATE = Hygiene()


def redact(text: str, limit: int = 120) -> str:
    """``text`` shortened, with every long hex/base64 run removed: safe to print."""
    return _REDACT.sub("…", text)[:limit]


# --- every log record ------------------------------------------------------------------------

_FORMATTER = logging.Formatter()
_original_handle = logging.Logger.handle


def _capture_record(record: logging.LogRecord) -> None:
    try:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + _FORMATTER.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + record.stack_info
    except Exception:  # a record that cannot format is not ours to fail on
        return
    where = f"a log record of {record.name!r} ({record.levelname}: {redact(str(record.msg))!r})"
    STATE.capture(where, text)


def _handle(self: logging.Logger, record: logging.LogRecord) -> None:
    """``Logger.handle`` for every record of every logger, whatever the handlers are."""
    _capture_record(record)
    _original_handle(self, record)


# --- wrapping the places that make secrets ------------------------------------------------------


def _wrap(owner: Any, name: str, after: Callable[..., None]) -> None:
    """Replace ``owner.name`` by a wrapper calling ``after(result, *args, **kwargs)``.

    A failing ``after`` never changes what the code under test sees, but it is
    recorded as a finding: whatever it should have registered went unregistered.
    """
    original = getattr(owner, name)
    where = f"the hygiene hook on {getattr(owner, '__name__', owner)}.{name}"

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        try:
            after(result, *args, **kwargs)
        except Exception as exc:
            failure = f"{where} ({type(exc).__name__}: {redact(str(exc))})"
            STATE.findings.append(Finding(STATE.current, "a secret not registered", "-", failure))
        return result

    setattr(owner, name, wrapper)


_KEY_CLASSES: set[type] = set()
_SHARED = "an ML-KEM shared secret"


def _register_key(kind: str, key: Any) -> None:
    """Register the secret parts of a key a backend made; wrap its class once."""
    for part in key.secret_parts():
        STATE.register(kind, part)
    cls = type(key)
    if cls not in _KEY_CLASSES:
        _KEY_CLASSES.add(cls)
        if hasattr(cls, "decapsulate"):
            _wrap(cls, "decapsulate", lambda r, *a, **k: STATE.register(_SHARED, r))
    _repr_of(kind, key)


def _wrap_backend(backend: type) -> None:
    """Register every secret that a backend class's methods make (the ``Backend`` interface).

    Keys: their ``secret_parts()`` and the seed they were made from; ML-KEM
    shared secrets from ``kem_encapsulate`` and from the key class's
    ``decapsulate`` (wrapped the first time a key of that class is made, before
    it is returned, so every call is seen).
    """

    def kem_key(key: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) >= 3:
            STATE.register("an ML-KEM seed", args[2])  # kem_from_seed(self, algorithm, seed)
        _register_key("an ML-KEM private key", key)

    def signing_key(key: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) >= 3:
            STATE.register("an ML-DSA seed", args[2])  # signing_from_seed(self, algorithm, seed)
        _register_key("an ML-DSA private key", key)

    for name in ("kem_generate", "kem_from_seed"):
        _wrap(backend, name, kem_key)
    for name in ("signing_generate", "signing_from_seed"):
        _wrap(backend, name, signing_key)
    _wrap(backend, "kem_encapsulate", lambda r, *a, **k: STATE.register(_SHARED, r[0]))


def _repr_of(where: str, obj: object) -> None:
    STATE.capture(f"the repr of {type(obj).__name__} ({where})", f"{obj!r}\n{obj!s}")


def _install_wrappers() -> None:
    from qcall import config, exceptions, pqc
    from qcall.call import keylog, media, srtp, srtpcore
    from qcall.handshake import keyschedule, protocol
    from qcall.qkd import etsi014, keyfile, kme

    reg = STATE.register

    # ML-DSA and ML-KEM keys and ML-KEM shared secrets (FIPS 203/204), every backend.
    for name in pqc.BACKENDS:
        _wrap_backend(pqc.backend_class(name))

    # QKD keys: ETSI 014 key containers, the handshake's keys, every KME pool.
    def qkd_key(_: None, self: Any, *args: Any, **kwargs: Any) -> None:
        reg("a QKD key", self.key)
        _repr_of("QKD key", self)

    _wrap(etsi014.QKDKey, "__init__", qkd_key)
    _wrap(protocol.QKDKey, "__init__", qkd_key)

    original_supply = kme.KME.supply

    @functools.wraps(original_supply)
    def supply(self: Any, master: str, slave: str, keys: Any, *args: Any, **kwargs: Any) -> Any:
        keys = list(keys)
        for _, key in keys:
            reg("a QKD key", key)
        return original_supply(self, master, slave, keys, *args, **kwargs)

    kme.KME.supply = supply  # type: ignore[method-assign]

    # SRTP master keys and salts, the epoch secret; the DTLS exporter.
    def epoch_keys(keys: Any, *args: Any, **kwargs: Any) -> None:
        for material in (keys.caller_to_callee, keys.callee_to_caller):
            reg("an SRTP master key", material.key)
            reg("an SRTP master salt", material.salt)
        reg("a key-schedule epoch secret", keys.secret)
        _repr_of("epoch keys", keys)

    def srtp_keys(_: None, self: Any, *args: Any, **kwargs: Any) -> None:
        for name in ("local_key", "remote_key"):
            reg("an SRTP master key", getattr(self, name))
        for name in ("local_salt", "remote_salt"):
            reg("an SRTP master salt", getattr(self, name))
        _repr_of("SRTP keys", self)

    def schedule(_: None, self: Any, *args: Any, **kwargs: Any) -> None:
        if self.handshake_secret is not None:
            reg("a key-schedule handshake secret", self.handshake_secret)
        epoch_keys(self.current)

    _wrap(keyschedule.KeySchedule, "__init__", schedule)
    _wrap(keyschedule.KeySchedule, "ratchet", epoch_keys)
    _wrap(srtpcore.SRTPKeys, "__init__", srtp_keys)
    _wrap(srtp, "export_exporter_secret", lambda r, *a, **k: reg("a DTLS exporter secret", r))

    def exporter(_: None, self: Any, secret: bytes, *args: Any, **kwargs: Any) -> None:
        reg("a DTLS exporter secret", secret)

    _wrap(protocol.HandshakeProtocol, "receive_dtls_exporter", exporter)

    # Every handshake event that leaves the Sans-I/O core: its repr.
    def events(result: list[Any], *args: Any, **kwargs: Any) -> None:
        for event in result:
            _repr_of("handshake event", event)

    _wrap(protocol.HandshakeProtocol, "events_received", events)

    # Every qcall exception, raised or not: the class and everything it was given
    # (each constructor of the tree: KMEError keeps ``message`` and ``details``).
    def error_init(_: None, self: BaseException, *args: Any, **kwargs: Any) -> None:
        STATE.capture(f"a {type(self).__name__} exception", f"{args!r} {kwargs!r}")

    for cls in vars(exceptions).values():
        if isinstance(cls, type) and issubclass(cls, exceptions.QCallError):
            if cls is exceptions.QCallError or "__init__" in vars(cls):
                _wrap(cls, "__init__", error_init)

    # Files holding secrets.
    def written(_: None, path: Any, data: bytes, *args: Any, **kwargs: Any) -> None:
        mode = kwargs.get("mode", args[0] if args else config.PRIVATE_MODE)
        STATE.private_files.setdefault(Path(path).resolve(), f"written with mode {mode:o}")

    _wrap(config, "atomic_write", written)
    for module in list(sys.modules.values()):  # modules that imported it by name
        if getattr(module, "atomic_write", None) is config.atomic_write.__wrapped__:  # type: ignore[attr-defined]
            module.atomic_write = config.atomic_write  # type: ignore[attr-defined]
    _wrap(keylog, "_append", lambda r, path, *a, **k: _private(path, "the keylog"))
    _wrap(media.WavRecorder, "__init__", lambda r, s, *a, **k: _private(s.path, "a WAV recording"))
    _wrap(keyfile.KeyFile, "__init__", lambda r, s, *a, **k: _private(s.path, "a QKD key file"))

    original_chmod = os.chmod

    @functools.wraps(original_chmod)
    def chmod(path: Any, mode: int, *args: Any, **kwargs: Any) -> None:
        original_chmod(path, mode, *args, **kwargs)
        frame: FrameType | None = sys._getframe(1)
        for _ in range(3):  # the test itself, or pathlib.Path.chmod called by it
            if frame is None:
                break
            if Path(frame.f_code.co_filename).resolve().parent == _TESTS_DIR:
                with contextlib.suppress(OSError, TypeError, ValueError):
                    STATE.chmodded.add(Path(path).resolve())
                break
            frame = frame.f_back

    os.chmod = chmod
    _install_messaging_wrappers()


def _install_messaging_wrappers() -> None:
    """Messaging secrets: root, chain, generation and message keys, sender chains, file keys.

    Installed before any messaging module imports these functions by name.
    """
    from qcall.messaging import keyschedule  # first: the others import its functions by name

    reg = STATE.register

    def epoch(result: Any, *args: Any, **kwargs: Any) -> None:
        for name in ("root_key", "chain_key", "generation_seed"):
            reg("a messaging root/chain key", getattr(result, name))
        _repr_of("epoch secrets", result)

    def message_key(result: Any, *args: Any, **kwargs: Any) -> None:
        mk, next_key = result
        reg("a message key", mk.key)
        reg("a messaging chain key", next_key)

    _wrap(keyschedule, "epoch_secrets", epoch)
    _wrap(keyschedule, "chain_step", message_key)
    for name in ("root_key_0", "generation_chain", "store_key"):
        _wrap(keyschedule, name, lambda r, *a, **k: reg("a messaging key", r))

    from qcall.messaging import files, group, ratchet, session

    def holder(attr: str, kind: str) -> Callable[..., None]:
        def after(_: None, self: Any, *args: Any, **kwargs: Any) -> None:
            reg(kind, getattr(self, attr))
            _repr_of(kind, self)

        return after

    _wrap(ratchet.QKDMaterial, "__init__", holder("key", "a QKD key"))
    _wrap(group.SenderChain, "__init__", holder("chain_key", "a group sender chain key"))
    _wrap(files.FileOffer, "__init__", holder("key", "a file key"))
    _wrap(ratchet.Session, "__init__", lambda r, s, *a, **k: _repr_of("session", s.state))
    _wrap(session.Responder, "__init__", holder("signed_prekey_seed", "an ML-KEM prekey seed"))


def _private(path: Any, what: str) -> None:
    STATE.private_files[Path(path).resolve()] = what


def secret_file_problems() -> list[str]:
    """Files written for secrets that exist and are not mode 0600 (tests' chmods excepted)."""
    problems = []
    for path, what in sorted(STATE.private_files.items()):
        if "mode 644" in what and not _secret_name(path):
            continue  # a public file, written public on purpose (certificates, network.json)
        if path in STATE.chmodded:
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        mode = st.st_mode & 0o777
        if stat.S_ISREG(st.st_mode) and mode != 0o600:  # not /dev/full and the like
            problems.append(f"{path.name} ({what}) has mode {mode:o}, not 600: {path}")
    return problems


def _secret_name(path: Path) -> bool:
    return path.name in ("identity.key", "contacts.json") or path.suffix in (".key", ".wav")


# --- pytest hooks --------------------------------------------------------------------------------

_HYGIENE_TESTS = "test_hygiene.py"

#: Third-party loggers that log every media packet (headers only; they never see
#: a qcall key as text). At DEBUG they cost enough per packet to disturb the
#: latency tests, so they stay at INFO; every other logger runs at DEBUG.
PER_PACKET_LOGGERS = (
    "aiortc.rtcrtpsender",
    "aiortc.rtcrtpreceiver",
    "aiortc.rtcsctptransport",
    "aiortc.rtcdtlstransport",
    "aioice.ice",
)


def _logging_at_debug() -> None:
    """Root at DEBUG before each test (a CLI test may have reconfigured logging)."""
    logging.disable(logging.NOTSET)
    logging.getLogger().setLevel(logging.DEBUG)
    for name in PER_PACKET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "run_last: run after every other test (hygiene checks)")
    _install_wrappers()
    logging.Logger.handle = _handle  # type: ignore[method-assign]
    _logging_at_debug()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last = [item for item in items if item.get_closest_marker("run_last")]
    if last:
        items[:] = [item for item in items if item not in last] + last


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    STATE.scan_pending()  # whatever came between tests belongs to no test
    _logging_at_debug()
    STATE.current = item.nodeid
    yield
    STATE.scan_pending()
    STATE.current = "<session>"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(
        f"key hygiene: {STATE.secrets} secrets registered, {STATE.scanned_texts} texts "
        f"scanned in {STATE.scan_seconds:.1f} s, {len(STATE.findings)} finding(s)"
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    STATE.scan_pending()
    ran_check = any(_HYGIENE_TESTS in str(getattr(i, "fspath", "")) for i in session.items)
    if ran_check:
        return
    problems = [str(f) for f in STATE.findings] + secret_file_problems()
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["KEY HYGIENE: secrets leaked or secret files not private:", *problems]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


__all__ = ["STATE", "Finding", "Hygiene", "redact", "secret_file_problems"]
