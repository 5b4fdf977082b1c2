"""Contacts: pinned ML-DSA identities of peers (trust on first use, SAS verification).

The store is one JSON file (default ``contacts.json`` in the qcall home, mode 0600:
who you call is private)::

    {"version": 1,
     "contacts": {"bob": {"algorithm": "ML-DSA-65", "public_key": "<base64>",
                          "fingerprint": "ABCD ...", "verified": false,
                          "first_seen": 1764201600.0, "verified_at": null}}}

Rules (see ``docs/identity.md``):

* first sight of a name pins its key (TOFU) and logs a WARNING that it is unverified,
  unless the store is ``strict`` (then :class:`UnknownIdentityError`);
* the same key again is fine;
* another key raises :class:`IdentityChangedError`, naming both fingerprints.
  Nothing is changed: the user compares the SAS by voice and then runs
  ``qcall contacts forget NAME`` to allow re-pinning;
* ``mark_verified`` records that the user compared the SAS or the fingerprint;
* a peer certified by an organisation the user trusts (``qcall org trust``, see
  :mod:`qcall.org` and ``docs/seal.md`` §3.4) is verified by its certificate instead, with
  no trust on first use: a valid certificate for the presented key is enough; an
  expired or revoked one, or a certificate of that name for another key, is refused.

Every read-modify-write holds an exclusive ``fcntl.flock`` on ``contacts.json.lock``,
and every write is atomic (:func:`qcall.config.atomic_write`), so two processes
never lose each other's entries and a reader never sees a half-written file.
A corrupt file is reported (:class:`~qcall.exceptions.ConfigError`, naming the
field), never silently replaced.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcall import config, pqc
from qcall.exceptions import (
    ConfigError,
    IdentityChangedError,
    UnknownIdentityError,
)
from qcall.identity import fingerprint, scheme_for_public_key, short_fingerprint, validate_name

if TYPE_CHECKING:
    from qcall.org import OrgTrust

__all__ = ["CONTACTS_FILE", "Contact", "ContactStore", "describe_trust", "parse_contacts"]

logger = logging.getLogger(__name__)

#: File name of the store in the qcall home.
CONTACTS_FILE = "contacts.json"
#: Largest contacts file accepted (≈ 2000 ML-DSA-87 contacts).
MAX_FILE_SIZE = 8 * 1024 * 1024

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Contact:
    """A pinned peer identity.

    Attributes:
        name: the peer's name (as registered with the signaling server).
        scheme: ML-DSA parameter set of ``public_key``.
        public_key: the pinned raw ML-DSA public key.
        fingerprint: :func:`qcall.identity.fingerprint` of ``public_key``.
        verified: whether the user confirmed it (SAS compared by voice).
        first_seen: when it was pinned (seconds since the epoch).
        verified_at: when it was verified, or ``None``.
    """

    name: str
    scheme: pqc.SignatureScheme
    public_key: bytes
    fingerprint: str
    verified: bool
    first_seen: float
    verified_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as stored (and printed by ``qcall contacts … --json``)."""
        return {
            "algorithm": self.scheme.value,
            "public_key": base64.b64encode(self.public_key).decode("ascii"),
            "fingerprint": self.fingerprint,
            "verified": self.verified,
            "first_seen": self.first_seen,
            "verified_at": self.verified_at,
        }

    def __repr__(self) -> str:
        return (
            f"Contact(name={self.name!r}, scheme={self.scheme.value}, "
            f"fingerprint={self.fingerprint!r}, verified={self.verified})"
        )


def _field_error(name: str, field: str, reason: str) -> ConfigError:
    return ConfigError(f"contacts.{name}.{field}: {reason}")


def _parse_time(name: str, field: str, value: object, *, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _field_error(name, field, "must be a number of seconds")
    return float(value)


def _parse_contact(name: object, entry: object) -> Contact:
    """Validate one stored entry; raise ConfigError naming the bad field."""
    try:
        validate_name(name, "contact name")
    except ConfigError as exc:
        raise ConfigError(f"contacts: {exc}") from None
    assert isinstance(name, str)
    if not isinstance(entry, dict):
        raise ConfigError(f"contacts.{name}: must be an object")
    try:
        scheme = pqc.SignatureScheme(entry.get("algorithm"))
    except ValueError:
        raise _field_error(name, "algorithm", "not an ML-DSA parameter set") from None
    encoded = entry.get("public_key")
    if not isinstance(encoded, str):
        raise _field_error(name, "public_key", "must be a base64 string")
    try:
        public_key = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _field_error(name, "public_key", "is not valid base64") from None
    if len(public_key) != scheme.sizes.public_key:
        raise _field_error(name, "public_key", f"must be {scheme.sizes.public_key} bytes")
    if entry.get("fingerprint") != fingerprint(public_key):
        raise _field_error(name, "fingerprint", "does not match public_key")
    verified = entry.get("verified")
    if not isinstance(verified, bool):
        raise _field_error(name, "verified", "must be true or false")
    first_seen = _parse_time(name, "first_seen", entry.get("first_seen"), optional=False)
    assert first_seen is not None
    verified_at = _parse_time(name, "verified_at", entry.get("verified_at"), optional=True)
    return Contact(
        name, scheme, public_key, fingerprint(public_key), verified, first_seen, verified_at
    )


def parse_contacts(data: bytes, source: str = "contacts file") -> dict[str, Contact]:
    """Parse and validate the store's JSON (hostile input: typed errors only).

    Raises:
        ConfigError: naming ``source`` and the offending field.
    """
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(f"{source} is larger than {MAX_FILE_SIZE} bytes")
    try:
        obj: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source} is corrupt (not JSON: {exc}); fix or move it aside") from None
    try:
        if not isinstance(obj, dict):
            raise ConfigError("top level must be an object")
        if obj.get("version") != _FORMAT_VERSION:
            raise ConfigError(f"version: unsupported format {obj.get('version')!r}")
        entries = obj.get("contacts")
        if not isinstance(entries, dict):
            raise ConfigError("contacts: must be an object")
        return {name: _parse_contact(name, entry) for name, entry in entries.items()}
    except ConfigError as exc:
        raise ConfigError(f"{source} is corrupt ({exc}); fix or move it aside") from None



def describe_trust(trust: str | None) -> str:
    """How a peer was trusted (:meth:`ContactStore.peer_trust`), for people to read."""
    if not trust:
        return "trust unknown"
    if trust.startswith("organisation: "):
        return "verified by the organisation: " + trust.removeprefix("organisation: ")
    if trust == "verified":
        return "verified (SAS compared)"
    if trust == "unverified":
        return "UNVERIFIED: compare fingerprints or the SAS"
    return trust

class ContactStore:
    """Pinned peer identities in one JSON file, safe for concurrent processes.

    Args:
        path: the JSON file (usually ``qcall_home() / CONTACTS_FILE``); its
            directory must exist.
        strict: refuse unknown peers instead of pinning them on first use.
        clock: source of timestamps (seconds since the epoch).
        org: the organisations the user trusts; peers they certify need no pinning.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        strict: bool = False,
        clock: Callable[[], float] = time.time,
        org: OrgTrust | None = None,
    ) -> None:
        self.path = Path(path)
        self.strict = strict
        self._clock = clock
        self.org = org
        self._trust: dict[str, str] = {}
        self._cache: tuple[tuple[int, int, int, int], dict[str, Contact]] | None = None

    @classmethod
    def in_home(cls, home: str | os.PathLike[str], *, strict: bool = False) -> ContactStore:
        """The store in a qcall home directory (with the home's organisation trust)."""
        from qcall.org import OrgTrust

        return cls(Path(home) / CONTACTS_FILE, strict=strict, org=OrgTrust.in_home(home))

    def __repr__(self) -> str:
        return f"ContactStore({str(self.path)!r}, strict={self.strict})"

    # --- file access -------------------------------------------------------------------------

    def _read(self) -> dict[str, Contact]:
        """Current contacts; re-parsed only when the file changed.

        Every write replaces the file by rename, so (inode, mtime, size) of the
        open file identifies its content.
        """
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
                if self._cache is not None and self._cache[0] == key:
                    return dict(self._cache[1])
                data = f.read(MAX_FILE_SIZE + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from exc
        contacts = parse_contacts(data, str(self.path))
        self._cache = (key, contacts)
        return dict(contacts)

    def _write(self, contacts: dict[str, Contact]) -> None:
        obj = {
            "version": _FORMAT_VERSION,
            "contacts": {name: contacts[name].to_dict() for name in sorted(contacts)},
        }
        config.atomic_write(self.path, (json.dumps(obj, indent=2) + "\n").encode())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Contact]]:
        """Hold the lock file for a read-modify-write; yields the current contacts."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, config.PRIVATE_MODE)
        except OSError as exc:
            raise ConfigError(f"cannot open lock file {lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._read()
        finally:
            os.close(fd)  # releases the flock

    # --- queries ----------------------------------------------------------------------------

    def get(self, name: str) -> Contact | None:
        """The contact called ``name``, or ``None``."""
        return self._read().get(name)

    def list(self) -> builtins.list[Contact]:
        """All contacts, sorted by name."""
        contacts = self._read()
        return [contacts[name] for name in sorted(contacts)]

    # --- the handshake hook --------------------------------------------------------------------

    def check_peer(self, name: str, public_key: bytes) -> None:
        """Check a peer's identity key: by its organisation certificate, else pinned (TOFU).

        Call this after the peer's transcript signature verified with
        ``public_key``. If a trusted organisation certifies ``name`` (a certificate
        imported with ``qcall org import``), that certificate decides, with no pinning.
        Otherwise, on first sight the key is pinned (and a WARNING logged, since it
        is unverified); afterwards it must stay the same.

        After it returns, :meth:`peer_trust` says how the peer was trusted.

        Raises:
            CertificateError: the certificate of this key is expired, revoked or not
                from a trusted authority (the subclass and message say which).
            IdentityChangedError: ``name`` is pinned to (or certified for) another key.
            UnknownIdentityError: ``name`` is unknown and the store is strict.
            InvalidKeyError: ``public_key`` is not an ML-DSA public key.
            ConfigError: bad ``name``, or the store file is corrupt.
        """
        validate_name(name, "contact name")
        scheme_for_public_key(public_key)
        self._trust.pop(name, None)
        if self.org is not None and self.org.exists():
            member = self.org.check_peer(name, public_key)
            if member is not None:
                logger.info(
                    "= %r is certified by %s (serial %s): verified by the organisation",
                    name,
                    member.organisation,
                    member.serial_hex,
                )
                self._trust[name] = f"organisation: {member.describe()}"
                return
        pinned = self.get(name)  # fast path: no lock needed to compare
        if pinned is not None:
            self._compare(pinned, public_key)
            self._trust[name] = "verified" if pinned.verified else "unverified"
            return
        if self.strict:
            raise UnknownIdentityError(
                f"{name!r} is not in your contacts and unknown peers are refused; "
                f"compare fingerprints, then: qcall contacts pin {name} --key FILE"
            )
        with self._locked() as contacts:
            if name in contacts:  # pinned meanwhile by another process
                self._compare(contacts[name], public_key)
                self._trust[name] = "verified" if contacts[name].verified else "unverified"
                return
            contact = self._new_contact(name, public_key)
            contacts[name] = contact
            self._write(contacts)
        logger.warning(
            "! pinned new contact %r, fingerprint %s: UNVERIFIED, compare the SAS by voice "
            "and then run 'qcall contacts verify %s'",
            name,
            contact.fingerprint,
            name,
        )
        self._trust[name] = "unverified"

    def peer_trust(self, name: str) -> str | None:
        """How :meth:`check_peer` last accepted ``name``, for display.

        ``"organisation: <who>"`` (a valid certificate of a trusted organisation),
        ``"verified"`` (pinned, SAS compared), ``"unverified"`` (pinned on first
        use), or ``None`` if ``name`` was not checked (or was refused).
        """
        return self._trust.get(name)

    def _compare(self, pinned: Contact, public_key: bytes) -> None:
        if pqc.constant_time_eq(pinned.public_key, bytes(public_key)):
            return
        new = fingerprint(bytes(public_key))
        # Logged at INFO only: the exception carries the warning, and its owner shows
        # it once (the CLI prints it; a log line too would say it twice).
        logger.info(
            "! identity key of %r changed: pinned %s, presented %s",
            pinned.name,
            pinned.fingerprint,
            new,
        )
        # No SAS to compare: the call was refused before any audio, so the advice is a
        # fingerprint check over another channel, which works without a call.
        raise IdentityChangedError(
            f"WARNING: THE IDENTITY KEY OF {pinned.name!r} HAS CHANGED!\n"
            f"  pinned:    {pinned.fingerprint}"
            f" ({'verified' if pinned.verified else 'unverified'})\n"
            f"  presented: {new}\n"
            "Someone may be intercepting this call (man-in-the-middle), or the contact "
            "has a new key. The call was refused: no call takes place with a changed key.\n"
            f"If {pinned.name} really has a new key, ask them for its fingerprint over a "
            "channel you trust (in person, or a call with a verified contact; they see it "
            "with `qcall identity show`) and compare it with the presented one above; if "
            "it matches, run:\n"
            f"  qcall contacts forget {pinned.name}\n"
            "and call again to pin the new key."
        )

    def _new_contact(self, name: str, public_key: bytes, *, verified: bool = False) -> Contact:
        now = float(self._clock())
        return Contact(
            name=name,
            scheme=scheme_for_public_key(public_key),
            public_key=bytes(public_key),
            fingerprint=fingerprint(public_key),
            verified=verified,
            first_seen=now,
            verified_at=now if verified else None,
        )

    # --- changes ------------------------------------------------------------------------------

    def pin(
        self, name: str, public_key: bytes, *, verified: bool = False, replace: bool = False
    ) -> Contact:
        """Pin ``public_key`` for ``name`` explicitly (for example from a key file).

        Pinning the same key again keeps the entry (and can mark it verified).

        Raises:
            IdentityChangedError: another key is pinned and ``replace`` is false.
            InvalidKeyError: not an ML-DSA public key.
            ConfigError: bad ``name`` or corrupt store.
        """
        validate_name(name, "contact name")
        scheme_for_public_key(public_key)
        with self._locked() as contacts:
            old = contacts.get(name)
            if old is not None and not replace:
                self._compare(old, public_key)
            if old is not None and old.public_key == public_key:
                if verified and not old.verified:
                    old = self._verified(old)
                    contacts[name] = old
                    self._write(contacts)
                return old
            contact = self._new_contact(name, public_key, verified=verified)
            contacts[name] = contact
            self._write(contacts)
        logger.info("= pinned %r (%s)", name, short_fingerprint(public_key))
        return contact

    def _verified(self, contact: Contact) -> Contact:
        now = float(self._clock())
        return Contact(
            contact.name,
            contact.scheme,
            contact.public_key,
            contact.fingerprint,
            True,
            contact.first_seen,
            now,
        )

    def mark_verified(self, name: str) -> Contact:
        """Record that the user compared the SAS (or fingerprint) with ``name``.

        Raises:
            UnknownIdentityError: no such contact.
        """
        with self._locked() as contacts:
            contact = contacts.get(name)
            if contact is None:
                raise UnknownIdentityError(f"no contact named {name!r}")
            if not contact.verified:
                contact = self._verified(contact)
                contacts[name] = contact
                self._write(contacts)
        logger.info("= marked %r verified (%s)", name, short_fingerprint(contact.public_key))
        return contact

    def remove(self, name: str) -> Contact:
        """Forget ``name``, so that its next key is pinned afresh; returns the old entry.

        Raises:
            UnknownIdentityError: no such contact.
        """
        with self._locked() as contacts:
            contact = contacts.pop(name, None)
            if contact is None:
                raise UnknownIdentityError(f"no contact named {name!r}")
            self._write(contacts)
        logger.info("= forgot %r (%s)", name, short_fingerprint(contact.public_key))
        return contact
