"""ETSI GS QKD 014 V1.1.1 data formats: pure models, parsers and serializers.

ETSI GS QKD 014 ("Protocol and data format of REST-based key delivery API")
defines three methods (clause 5) and five JSON data formats (clause 6):

=====================  ==========================================  =============
Method (clause)        URL                                         Answer
=====================  ==========================================  =============
Get status (5.1)       GET  /api/v1/keys/{slave_SAE_ID}/status      Status
Get key (5.2)          POST|GET /api/v1/keys/{slave_SAE_ID}/enc_keys Key container
Get key with IDs (5.3) POST|GET /api/v1/keys/{master_SAE_ID}/dec_keys Key container
=====================  ==========================================  =============

Errors are HTTP 400 (bad request format), 401 (unauthorized) and 503 (error
on the server side), each with an Error object (6.5) as the body.

This module does no I/O. Parsers take the already-decoded JSON value
(``json.loads`` output) and treat it as hostile:

* the parsers of *answers* (Status, Key container, Error) are what a client
  runs, and raise :class:`~qcall.exceptions.KMEResponseError`;
* the parsers of *requests* (Key request, Key IDs) are what a KME runs, and
  raise :class:`~qcall.exceptions.KMEBadRequestError` whose ``message`` and
  ``details`` are ready to be sent back as the spec's Error object.

Every message names the offending field; none contains key bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from qcall.exceptions import KMEBadRequestError, KMEResponseError
from qcall.typing import KeyId, SAEId

__all__ = [
    "API_PREFIX",
    "APPLICATIONS",
    "APPLICATION_EXTENSION",
    "MAX_SAE_ID_LENGTH",
    "UNTAGGED",
    "KeyContainer",
    "KeyRequest",
    "KeyStatus",
    "QKDKey",
    "bad_request",
    "error_body",
    "key_fingerprint",
    "key_ids_application",
    "key_ids_json",
    "parse_error",
    "parse_key_container",
    "parse_key_ids",
    "parse_key_request",
    "parse_status",
    "request_application",
    "validate_application",
    "validate_key_id",
    "validate_sae_id",
]

#: Clause 5: every method lives under this path.
API_PREFIX: Final = "/api/v1/keys"

#: Longest SAE or KME ID accepted (the spec sets no limit; we do).
MAX_SAE_ID_LENGTH: Final = 128

#: Most keys accepted in one Key container or Key IDs object (hostile input).
MAX_KEYS_PER_MESSAGE: Final = 4096

#: Largest key accepted, in bits (hostile input).
MAX_KEY_BITS: Final = 1 << 20

_SAE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
_UUID_RE: Final = re.compile(r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}")


def key_fingerprint(key: bytes) -> str:
    """Return a short, non-reversible tag of ``key`` for logs and screens.

    It is the first 8 bytes of SHA-256(key), in hex: enough to tell whether
    two sides hold the same key, useless to recover it.
    """
    return hashlib.sha256(key).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class QKDKey:
    """One key of a Key container (ETSI GS QKD 014, 6.3): ``key_ID`` and key bytes.

    The repr and str show the key_ID and a short hash only, never the key.

    Attributes:
        key_id: the key_ID, a UUID (``8-4-4-4-12`` hex digits) as the KME wrote it.
        key: the key bytes (decoded from base64).
        key_id_extension: the optional ``key_ID_extension`` object.
        key_extension: the optional ``key_extension`` object.
    """

    key_id: KeyId
    key: bytes = field(repr=False)
    key_id_extension: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    key_extension: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def size_bits(self) -> int:
        """Key size in bits."""
        return len(self.key) * 8

    @property
    def fingerprint(self) -> str:
        """Short hash of the key (see :func:`key_fingerprint`)."""
        return key_fingerprint(self.key)

    def __repr__(self) -> str:
        return f"QKDKey(key_id={self.key_id!r}, bits={self.size_bits}, sha256={self.fingerprint})"

    __str__ = __repr__

    def to_json(self) -> dict[str, Any]:
        """Return the spec's key object ``{key_ID, key, …}`` (key in base64)."""
        obj: dict[str, Any] = {"key_ID": self.key_id}
        if self.key_id_extension is not None:
            obj["key_ID_extension"] = dict(self.key_id_extension)
        obj["key"] = base64.b64encode(self.key).decode("ascii")
        if self.key_extension is not None:
            obj["key_extension"] = dict(self.key_extension)
        return obj


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """The Status data format (ETSI GS QKD 014, 6.1).

    ``status_extension`` may carry a link alarm set by the trusted-node relay:
    ``{"alarm": "…", "qber": 0.25}`` (see :attr:`alarm`, :attr:`qber`).
    """

    source_kme_id: str
    target_kme_id: str
    master_sae_id: SAEId
    slave_sae_id: SAEId
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_sae_id_count: int
    status_extension: Mapping[str, Any] | None = None

    @property
    def alarm(self) -> str | None:
        """The alarm text in ``status_extension``, if any."""
        ext = self.status_extension or {}
        value = ext.get("alarm")
        return value if isinstance(value, str) else None

    @property
    def qber(self) -> float | None:
        """The QBER reported in ``status_extension``, if any."""
        ext = self.status_extension or {}
        value = ext.get("qber")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None

    def to_json(self) -> dict[str, Any]:
        """Return the spec's Status object."""
        obj: dict[str, Any] = {
            "source_KME_ID": self.source_kme_id,
            "target_KME_ID": self.target_kme_id,
            "master_SAE_ID": self.master_sae_id,
            "slave_SAE_ID": self.slave_sae_id,
            "key_size": self.key_size,
            "stored_key_count": self.stored_key_count,
            "max_key_count": self.max_key_count,
            "max_key_per_request": self.max_key_per_request,
            "max_key_size": self.max_key_size,
            "min_key_size": self.min_key_size,
            "max_SAE_ID_count": self.max_sae_id_count,
        }
        if self.status_extension is not None:
            obj["status_extension"] = dict(self.status_extension)
        return obj


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """The Key request data format (ETSI GS QKD 014, 6.2).

    ``number`` defaults to 1 and ``size`` (bits) to the KME's ``key_size``
    (``None`` here means "not given").
    """

    number: int = 1
    size: int | None = None
    additional_slave_sae_ids: tuple[SAEId, ...] = ()
    extension_mandatory: tuple[Mapping[str, Any], ...] = ()
    extension_optional: tuple[Mapping[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Return the spec's Key request object (only the fields that are set)."""
        obj: dict[str, Any] = {"number": self.number}
        if self.size is not None:
            obj["size"] = self.size
        if self.additional_slave_sae_ids:
            obj["additional_slave_SAE_IDs"] = list(self.additional_slave_sae_ids)
        if self.extension_mandatory:
            obj["extension_mandatory"] = [dict(e) for e in self.extension_mandatory]
        if self.extension_optional:
            obj["extension_optional"] = [dict(e) for e in self.extension_optional]
        return obj


@dataclass(frozen=True, slots=True)
class KeyContainer:
    """The Key container data format (ETSI GS QKD 014, 6.3)."""

    keys: tuple[QKDKey, ...]
    key_container_extension: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the spec's Key container object."""
        obj: dict[str, Any] = {"keys": [k.to_json() for k in self.keys]}
        if self.key_container_extension is not None:
            obj["key_container_extension"] = dict(self.key_container_extension)
        return obj


# --- validation helpers ------------------------------------------------------------


def validate_sae_id(value: object, what: str = "SAE_ID") -> SAEId:
    """Return ``value`` as an SAE (or KME) ID, or raise :class:`ValueError`.

    The spec leaves the form open; we accept 1-128 characters of
    ``[A-Za-z0-9._:@-]`` starting with a letter or digit, so IDs are safe in
    URL paths, file names and certificate common names.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    if not 0 < len(value) <= MAX_SAE_ID_LENGTH or not _SAE_ID_RE.fullmatch(value):
        raise ValueError(f"{what} {_preview(value)} is not a valid ID")
    return SAEId(value)


def validate_key_id(value: object, what: str = "key_ID", *, canonical: bool = True) -> KeyId:
    """Return ``value`` as a key_ID, or raise :class:`ValueError`.

    ETSI GS QKD 014, 6.3: "key_ID … UUID format". With ``canonical`` (what a
    KME does with what it receives) the result is the lower-case canonical
    form; without (what a client does with a KME's key_IDs) the text is kept
    as the KME wrote it, since another KME may compare key_IDs as strings.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a UUID string")
    if not _UUID_RE.fullmatch(value):
        raise ValueError(f"{what} {_preview(value)} is not a UUID")
    return KeyId(value.lower() if canonical else value)


def _preview(value: str) -> str:
    """Quote at most 8 characters of a rejected value for an error message.

    A misplaced secret (a KME answer with ``key`` and ``key_ID`` swapped)
    must not reach messages and logs: 8 base64 characters are 6 bytes, too
    few to matter, and enough to recognise a UUID (found by
    tests/test_fuzz_kme_server.py and the key-hygiene scan).
    """
    return repr(value[:8]) + ("…" if len(value) > 8 else "")


def _canonical(key_id: str) -> str:
    return key_id.lower()


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a JSON object")
    return value


def _opt_object(obj: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    value = obj.get(name)
    if value is None:
        return None
    return _object(value, name)


def _int(obj: Mapping[str, Any], name: str, *, minimum: int = 0, default: int | None = None) -> int:
    value = obj.get(name, default)
    if value is None:
        raise ValueError(f"{name} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}")
    if value > 2**53:
        raise ValueError(f"{name} is too large")
    return value


def _str(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        raise ValueError(f"{name} is missing")
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    if len(value) > MAX_SAE_ID_LENGTH:
        raise ValueError(f"{name} is too long")
    return value


def _list(obj: Mapping[str, Any], name: str, *, required: bool) -> list[Any]:
    value = obj.get(name)
    if value is None:
        if required:
            raise ValueError(f"{name} is missing")
        return []
    if not isinstance(value, list):
        raise ValueError(f"{name} must be an array")
    if len(value) > MAX_KEYS_PER_MESSAGE:
        raise ValueError(f"{name} has too many entries")
    return value


def _extensions(obj: Mapping[str, Any], name: str) -> tuple[Mapping[str, Any], ...]:
    return tuple(_object(e, f"{name}[{i}]") for i, e in enumerate(_list(obj, name, required=False)))


# --- answers (parsed by clients) ------------------------------------------------------


def parse_status(data: object) -> KeyStatus:
    """Parse a Status object (ETSI GS QKD 014, 6.1).

    Raises:
        KMEResponseError: a field is missing, of the wrong type or out of range.
    """
    try:
        obj = _object(data, "Status")
        status = KeyStatus(
            source_kme_id=_str(obj, "source_KME_ID"),
            target_kme_id=_str(obj, "target_KME_ID"),
            master_sae_id=SAEId(_str(obj, "master_SAE_ID")),
            slave_sae_id=SAEId(_str(obj, "slave_SAE_ID")),
            key_size=_int(obj, "key_size", minimum=1),
            stored_key_count=_int(obj, "stored_key_count"),
            max_key_count=_int(obj, "max_key_count"),
            max_key_per_request=_int(obj, "max_key_per_request"),
            max_key_size=_int(obj, "max_key_size", minimum=1),
            min_key_size=_int(obj, "min_key_size", minimum=1),
            max_sae_id_count=_int(obj, "max_SAE_ID_count"),
            status_extension=_opt_object(obj, "status_extension"),
        )
    except ValueError as exc:
        raise KMEResponseError(f"invalid Status from KME: {exc}") from None
    if status.min_key_size > status.max_key_size:
        raise KMEResponseError("invalid Status from KME: min_key_size exceeds max_key_size")
    return status


def parse_key_container(
    data: object,
    *,
    expected_number: int | None = None,
    expected_size: int | None = None,
    expected_ids: Sequence[KeyId] | None = None,
) -> KeyContainer:
    """Parse a Key container (ETSI GS QKD 014, 6.3) and check it answers our request.

    Args:
        data: the decoded JSON body.
        expected_number: the number of keys requested (``enc_keys``).
        expected_size: the key size requested, in bits.
        expected_ids: the key_IDs requested (``dec_keys``); the answer must
            hold exactly these, each once (order and letter case may differ).

    Returns:
        The container, with keys in the order of ``expected_ids`` if given.

    Raises:
        KMEResponseError: malformed JSON structure, bad base64, a key_ID that
            is not a UUID, duplicate or missing key_IDs, wrong count or size.
    """
    try:
        obj = _object(data, "Key container")
        keys: list[QKDKey] = []
        for i, entry in enumerate(_list(obj, "keys", required=True)):
            item = _object(entry, f"keys[{i}]")
            key_id = validate_key_id(item.get("key_ID"), f"keys[{i}].key_ID", canonical=False)
            encoded = item.get("key")
            if not isinstance(encoded, str):
                raise ValueError(f"keys[{i}].key must be a base64 string")
            if len(encoded) > MAX_KEY_BITS // 6 + 4:
                raise ValueError(f"keys[{i}].key is too long")
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"keys[{i}].key is not valid base64") from None
            if not key:
                raise ValueError(f"keys[{i}].key is empty")
            keys.append(
                QKDKey(
                    key_id,
                    key,
                    key_id_extension=_opt_object(item, "key_ID_extension"),
                    key_extension=_opt_object(item, "key_extension"),
                )
            )
        extension = _opt_object(obj, "key_container_extension")
    except ValueError as exc:
        raise KMEResponseError(f"invalid Key container from KME: {exc}") from None

    seen: dict[str, QKDKey] = {}  # canonical key_ID -> key
    for k in keys:
        canonical = _canonical(k.key_id)
        if canonical in seen:
            raise KMEResponseError(f"KME returned key_ID {k.key_id} twice")
        seen[canonical] = k
        if expected_size is not None and k.size_bits != expected_size:
            raise KMEResponseError(
                f"KME returned key {k.key_id} of {k.size_bits} bits, requested {expected_size}"
            )
    if expected_number is not None and len(keys) != expected_number:
        raise KMEResponseError(f"KME returned {len(keys)} keys, requested {expected_number}")
    if expected_ids is not None:
        wanted = [_canonical(i) for i in expected_ids]
        missing = [i for i, c in zip(expected_ids, wanted, strict=True) if c not in seen]
        if missing:
            raise KMEResponseError(f"KME did not return key_ID {missing[0]}")
        if len(keys) != len(expected_ids):
            extra = sorted(set(seen) - set(wanted))
            raise KMEResponseError(f"KME returned key_ID {extra[0]} that was not requested")
        keys = [seen[c] for c in wanted]
    return KeyContainer(tuple(keys), extension)


def parse_error(data: object) -> tuple[str | None, list[object]]:
    """Parse an Error object (ETSI GS QKD 014, 6.5) leniently.

    An error answer is already an error: a malformed Error body must not hide
    the HTTP status, so this never raises. It returns ``(message, details)``
    with ``message`` cut to 300 characters and at most 20 ``details``.
    """
    if not isinstance(data, Mapping):
        return None, []
    message = data.get("message")
    text = message[:300] if isinstance(message, str) else None
    details = data.get("details")
    return text, (details[:20] if isinstance(details, list) else [])


# --- requests (parsed by KMEs) ---------------------------------------------------------


def bad_request(message: str, details: list[object] | None = None) -> KMEBadRequestError:
    """Build the :class:`KMEBadRequestError` a KME answers with HTTP 400."""
    return KMEBadRequestError(message, status=400, message=message, details=details)


def error_body(message: str, details: Sequence[object] | None = None) -> dict[str, Any]:
    """Return the spec's Error object (6.5)."""
    obj: dict[str, Any] = {"message": message}
    if details:
        obj["details"] = list(details)
    return obj


def parse_key_request(data: object) -> KeyRequest:
    """Parse a Key request (ETSI GS QKD 014, 6.2) sent to ``enc_keys``.

    Only the format is checked here; whether ``number`` and ``size`` can be
    served is the KME's business (:meth:`qcall.qkd.kme.KME.enc_keys`).

    Raises:
        KMEBadRequestError: the body is not a Key request; ``message`` names the field.
    """
    try:
        obj = _object(data, "Key request")
        number = _int(obj, "number", minimum=1, default=1)
        size = None if obj.get("size") is None else _int(obj, "size", minimum=1)
        slaves = tuple(
            validate_sae_id(s, f"additional_slave_SAE_IDs[{i}]")
            for i, s in enumerate(_list(obj, "additional_slave_SAE_IDs", required=False))
        )
        return KeyRequest(
            number=number,
            size=size,
            additional_slave_sae_ids=slaves,
            extension_mandatory=_extensions(obj, "extension_mandatory"),
            extension_optional=_extensions(obj, "extension_optional"),
        )
    except ValueError as exc:
        raise bad_request(f"invalid Key request: {exc}") from None


def parse_key_ids(data: object) -> tuple[KeyId, ...]:
    """Parse a Key IDs object (ETSI GS QKD 014, 6.4) sent to ``dec_keys``.

    ``key_ID_extension`` and ``key_IDs_extension`` are accepted and ignored
    (this KME defines no extensions).

    Raises:
        KMEBadRequestError: not a Key IDs object, no key_IDs, a key_ID that is
            not a UUID, or the same key_ID twice.
    """
    try:
        obj = _object(data, "Key IDs")
        entries = _list(obj, "key_IDs", required=True)
        if not entries:
            raise ValueError("key_IDs is empty")
        ids: list[KeyId] = []
        for i, entry in enumerate(entries):
            item = _object(entry, f"key_IDs[{i}]")
            ids.append(validate_key_id(item.get("key_ID"), f"key_IDs[{i}].key_ID"))
            _opt_object(item, "key_ID_extension")
        _opt_object(obj, "key_IDs_extension")
    except ValueError as exc:
        raise bad_request(f"invalid Key IDs: {exc}") from None
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise bad_request("invalid Key IDs: duplicate key_ID", [{"key_ID": dup}])
    return tuple(ids)


def key_ids_json(key_ids: Sequence[KeyId], application: str | None = None) -> dict[str, Any]:
    """Return the spec's Key IDs object (6.4) for ``key_ids``.

    With ``application``, the object carries qcall's accounting tag as
    ``key_IDs_extension: {"qcall_application": application}``.
    """
    obj: dict[str, Any] = {"key_IDs": [{"key_ID": k} for k in key_ids]}
    if application is not None:
        obj["key_IDs_extension"] = {APPLICATION_EXTENSION: validate_application(application)}
    return obj


# --- qcall's accounting tag (docs/etsi014.md, "Key accounting") ---------------------

#: Extension parameter naming the application that spends a key: in a Key request
#: (6.2) as ``extension_optional: [{"qcall_application": NAME}]`` (or mandatory),
#: in a Key IDs object (6.4) as ``key_IDs_extension: {"qcall_application": NAME}``.
APPLICATION_EXTENSION = "qcall_application"

#: The applications qcall's own clients name (any other valid name is counted too).
APPLICATIONS = ("call-setup", "rekey", "message", "otp")

#: What an untagged request is counted as.
UNTAGGED = "untagged"

_APPLICATION_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


def validate_application(value: object) -> str:
    """Return ``value`` as an application tag (``[a-z][a-z0-9-]{0,31}``), or raise ValueError."""
    if not isinstance(value, str) or not _APPLICATION_RE.match(value):
        raise ValueError(f"{APPLICATION_EXTENSION} must match [a-z][a-z0-9-]{{0,31}}, "
                         f"not {_preview(str(value))}")
    return value


def request_application(request: KeyRequest) -> str:
    """The application tag of a Key request (6.2), or :data:`UNTAGGED`.

    Raises:
        KMEBadRequestError: the tag is present but invalid, or given twice.
    """
    found = [
        ext[APPLICATION_EXTENSION]
        for ext in (*request.extension_mandatory, *request.extension_optional)
        if APPLICATION_EXTENSION in ext
    ]
    if not found:
        return UNTAGGED
    if len(found) > 1:
        raise bad_request(f"{APPLICATION_EXTENSION} given more than once")
    try:
        return validate_application(found[0])
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def key_ids_application(data: object) -> str:
    """The application tag of a Key IDs object (6.4), or :data:`UNTAGGED`.

    Call after :func:`parse_key_ids` accepted ``data``.

    Raises:
        KMEBadRequestError: the tag is present but invalid.
    """
    ext = data.get("key_IDs_extension") if isinstance(data, Mapping) else None
    if not isinstance(ext, Mapping) or APPLICATION_EXTENSION not in ext:
        return UNTAGGED
    try:
        return validate_application(ext[APPLICATION_EXTENSION])
    except ValueError as exc:
        raise bad_request(str(exc)) from None
