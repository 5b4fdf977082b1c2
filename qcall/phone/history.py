"""Recent and missed calls, kept in the user's qcall home (``calls.json``, mode 0600).

The file is one JSON object, replaced atomically on every change
(:func:`qcall.config.atomic_write`), so a crash leaves the old or the new list,
never a mix::

    {"version": 1,
     "calls": [{"call_id": "…", "peer": "bob", "direction": "incoming",
                "outcome": "missed", "started_at": 1767225600.0, "duration": 0.0,
                "policy": "", "error": "", "seen": false}]}

Newest last; at most :data:`MAX_CALLS` are kept. Who one calls is private: the
file is readable by its owner only. A corrupt file is reported
(:class:`~qcall.exceptions.ConfigError`, naming the file and the field), never
silently replaced.
"""

from __future__ import annotations

import enum
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qcall import config
from qcall.exceptions import ConfigError
from qcall.identity import validate_name

__all__ = ["CALLS_FILE", "CallHistory", "CallRecord", "Outcome"]

#: File name in the qcall home.
CALLS_FILE = "calls.json"
#: Calls kept (the oldest go first).
MAX_CALLS = 500
#: Largest file read.
MAX_FILE_SIZE = 1024 * 1024
_VERSION = 1
_MAX_TEXT = 300


class Outcome(enum.Enum):
    """How a call ended, as the recent-calls screen says it."""

    ANSWERED = "answered"  # it connected (duration: from connection to hang-up)
    MISSED = "missed"  # incoming; the caller gave up (or the ring timed out) unanswered
    DECLINED = "declined"  # incoming; the user declined
    NO_ANSWER = "no answer"  # outgoing; we gave up, or the peer declined or was busy
    FAILED = "failed"  # it could not be set up (``error`` says why)


@dataclass(frozen=True)
class CallRecord:
    """One call in the history (no key material: names, times, policy, error text)."""

    call_id: str
    peer: str
    direction: str
    outcome: Outcome
    started_at: float
    duration: float = 0.0
    policy: str = ""
    error: str = ""
    seen: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.call_id, str) or not 1 <= len(self.call_id) <= 64:
            raise ValueError("call_id must be 1-64 characters")
        validate_name(self.peer, "peer")
        if self.direction not in ("incoming", "outgoing"):
            raise ValueError("direction must be 'incoming' or 'outgoing'")
        if not isinstance(self.outcome, Outcome):
            raise ValueError("outcome must be an Outcome")
        for field, value in (("started_at", self.started_at), ("duration", self.duration)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{field} must be a number")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{field} must be finite and not negative")
        for field, text in (("policy", self.policy), ("error", self.error)):
            if not isinstance(text, str) or len(text) > _MAX_TEXT:
                raise ValueError(f"{field} must be a string of at most {_MAX_TEXT} characters")
        if not isinstance(self.seen, bool):
            raise ValueError("seen must be a boolean")

    @property
    def missed(self) -> bool:
        """An incoming call nobody answered."""
        return self.outcome is Outcome.MISSED

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in the file."""
        return {
            "call_id": self.call_id,
            "peer": self.peer,
            "direction": self.direction,
            "outcome": self.outcome.value,
            "started_at": self.started_at,
            "duration": self.duration,
            "policy": self.policy,
            "error": self.error,
            "seen": self.seen,
        }

    @classmethod
    def from_dict(cls, obj: object) -> CallRecord:
        """Parse one stored record.

        Raises:
            ValueError: a field is missing or wrong (the message names it).
        """
        if not isinstance(obj, dict):
            raise ValueError("a call must be an object")
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
        for required in ("call_id", "peer", "direction", "outcome", "started_at"):
            if required not in obj:
                raise ValueError(f"missing field {required!r}")
        try:
            outcome = Outcome(obj["outcome"])
        except ValueError:
            raise ValueError(
                f"outcome {obj['outcome']!r} is not one of {[o.value for o in Outcome]}"
            ) from None
        fields = dict(obj, outcome=outcome)
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ValueError(str(exc)) from None


class CallHistory:
    """The recent-calls list of one user, in one JSON file.

    Args:
        path: the file (usually ``qcall_home() / CALLS_FILE``); its folder must exist.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._records = self._load()

    @classmethod
    def in_home(cls, home: str | os.PathLike[str]) -> CallHistory:
        """The history in a qcall home directory."""
        return cls(Path(home) / CALLS_FILE)

    def __repr__(self) -> str:
        return f"CallHistory({str(self.path)!r}, {len(self._records)} calls)"

    def _load(self) -> list[CallRecord]:
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_FILE_SIZE + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from exc
        if len(data) > MAX_FILE_SIZE:
            raise ConfigError(f"{self.path} is larger than {MAX_FILE_SIZE} bytes")
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{self.path} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("version") != _VERSION:
            raise ConfigError(f"{self.path}: not a version {_VERSION} call history")
        calls = obj.get("calls")
        if not isinstance(calls, list):
            raise ConfigError(f"{self.path}: 'calls' must be a list")
        records = []
        for index, entry in enumerate(calls):
            try:
                records.append(CallRecord.from_dict(entry))
            except ValueError as exc:
                raise ConfigError(f"{self.path}: calls[{index}]: {exc}") from None
        return records[-MAX_CALLS:]

    def _save(self) -> None:
        obj = {"version": _VERSION, "calls": [record.to_dict() for record in self._records]}
        config.atomic_write(self.path, (json.dumps(obj, indent=1) + "\n").encode())

    def records(self) -> list[CallRecord]:
        """Every call kept, newest first."""
        return list(reversed(self._records))

    def missed(self) -> list[CallRecord]:
        """Missed calls, newest first."""
        return [record for record in self.records() if record.missed]

    def unseen_missed(self) -> int:
        """Missed calls the user has not looked at yet."""
        return sum(1 for record in self._records if record.missed and not record.seen)

    def add(self, record: CallRecord) -> None:
        """Append a call (dropping the oldest beyond :data:`MAX_CALLS`) and save."""
        self._records = [*self._records, record][-MAX_CALLS:]
        self._save()

    def mark_seen(self) -> None:
        """The user looked at the missed calls."""
        if any(not record.seen for record in self._records):
            self._records = [replace(record, seen=True) for record in self._records]
            self._save()
