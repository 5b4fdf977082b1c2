"""What ``qcall phone`` shows, as plain data: pure functions the screens render.

Nothing here does I/O or imports Textual: the controller
(:mod:`qcall.phone.controller`) gathers the facts (contacts, presence, the
organisation's certificates, the live :class:`~qcall.call.status.CallStatus`)
and these functions turn them into rows and lines, so that every rule of the
display is unit-tested without a terminal (docs/phone.md).

Verification of a contact, in the order the rules apply:

1. **key changed** — the key the signaling server announces for the name
   (its presence fingerprint) is not the one pinned or certified, or the last
   call was refused for a changed identity;
2. **organisation** — a certificate of an organisation the user trusts
   certifies the name's key (``qcall org import``);
3. **verified** — pinned and the SAS was compared (``qcall contacts verify``,
   or the confirm-SAS key in a call);
4. **unverified** — pinned on first use only;
5. **unknown** — never called: nothing pinned.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from qcall.call.status import CallState, CallStatus

__all__ = [
    "ContactRow",
    "RosterEntry",
    "Verification",
    "call_title",
    "contact_rows",
    "format_duration",
    "level_dbfs",
    "meter",
    "network_lines",
    "security_lines",
    "verification_of",
]

#: The quietest level a meter shows (dBFS); anything below is an empty bar.
METER_FLOOR_DB = -60.0


class Verification(enum.Enum):
    """How far the user can trust that a name is the person they mean."""

    KEY_CHANGED = "key changed"
    ORGANISATION = "organisation"
    VERIFIED = "verified"
    UNVERIFIED = "unverified"
    UNKNOWN = "unknown"

    @property
    def symbol(self) -> str:
        """A short mark for lists (text, so that it survives any terminal)."""
        return _SYMBOLS[self]


_SYMBOLS = {
    Verification.KEY_CHANGED: "!! KEY CHANGED",
    Verification.ORGANISATION: "org verified",
    Verification.VERIFIED: "SAS verified",
    Verification.UNVERIFIED: "unverified",
    Verification.UNKNOWN: "new",
}


@dataclass(frozen=True)
class RosterEntry:
    """What is known of one name before rendering.

    Attributes:
        name: the user name.
        pinned: fingerprint of the pinned key (contacts.json), or ``None``.
        sas_verified: the pinned key was verified by SAS or fingerprint.
        certified: fingerprint of the key an organisation certifies, or ``None``.
        organisation: who certifies it, for display ("" if nobody).
    """

    name: str
    pinned: str | None = None
    sas_verified: bool = False
    certified: str | None = None
    organisation: str = ""


@dataclass(frozen=True)
class ContactRow:
    """One line of the contacts screen."""

    name: str
    online: bool
    verification: Verification
    fingerprint: str
    detail: str


def verification_of(
    entry: RosterEntry | None, presented: str | None, *, changed: bool = False
) -> Verification:
    """Apply the rules of the module docstring to one name.

    Args:
        entry: what the contacts and the organisation know of the name, or ``None``.
        presented: the fingerprint the server announces for it now (``None``: offline).
        changed: the last call with it failed because its identity key changed.
    """
    if entry is None:
        return Verification.KEY_CHANGED if changed else Verification.UNKNOWN
    expected = entry.certified or entry.pinned
    if changed or (presented is not None and expected is not None and presented != expected):
        return Verification.KEY_CHANGED
    if entry.certified is not None:
        return Verification.ORGANISATION
    if entry.pinned is None:
        return Verification.UNKNOWN
    return Verification.VERIFIED if entry.sas_verified else Verification.UNVERIFIED


def contact_rows(
    roster: Iterable[RosterEntry],
    online: Mapping[str, str],
    changed: Iterable[str] = (),
) -> list[ContactRow]:
    """The contacts screen: every known name and everyone online, online first, by name.

    Args:
        roster: pinned contacts and organisation members.
        online: name → fingerprint of those online (the signaling presence list).
        changed: names whose last call was refused for a changed identity.
    """
    entries = {entry.name: entry for entry in roster}
    changed_set = set(changed)
    rows = []
    for name in set(entries) | set(online):
        entry = entries.get(name)
        presented = online.get(name)
        verification = verification_of(entry, presented, changed=name in changed_set)
        shown = presented or (entry.certified or entry.pinned if entry else None) or ""
        if verification is Verification.KEY_CHANGED:
            expected = entry.certified or entry.pinned if entry else None
            detail = f"expected {expected or '?'}, now {presented or 'refused'}; compare the SAS"
        elif verification is Verification.ORGANISATION and entry is not None:
            detail = f"certified by {entry.organisation}"
        else:
            detail = ""
        rows.append(ContactRow(name, presented is not None, verification, shown, detail))
    rows.sort(key=lambda row: (not row.online, row.name))
    return rows


# --- the call screen ----------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) of a non-negative duration."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def level_dbfs(rms: float) -> float:
    """Level of an RMS amplitude (full scale = 1.0) in dBFS, floored at :data:`METER_FLOOR_DB`."""
    if rms <= 0 or not math.isfinite(rms):
        return METER_FLOOR_DB
    return max(METER_FLOOR_DB, min(0.0, 20 * math.log10(rms)))


def meter(dbfs: float, width: int = 20) -> str:
    """A text bar of ``width`` cells for a level in dBFS (floor → empty, 0 dBFS → full)."""
    fraction = (max(METER_FLOOR_DB, min(0.0, dbfs)) - METER_FLOOR_DB) / -METER_FLOOR_DB
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled)


_STATE_WORDS = {
    CallState.NEW: "ringing",
    CallState.RINGING: "ringing",
    CallState.CONNECTING: "connecting",
    CallState.CONFIRMING: "confirming keys",
    CallState.ACTIVE: "in call",
    CallState.ENDED: "ended",
    CallState.FAILED: "failed",
}


def call_title(status: CallStatus, *, muted: bool = False, held: bool = False) -> str:
    """The call screen's title line: who, which way, in what state."""
    direction = "call to" if status.role == "caller" else "call from"
    state = _STATE_WORDS[status.state]
    flags = [word for word, on in (("on hold", held), ("muted", muted)) if on]
    return f"{direction} {status.peer} — {state}" + "".join(f" · {flag}" for flag in flags)


def _or_dash(value: object, unit: str = "") -> str:
    if value is None or value == "":
        return "—"
    return f"{value}{unit}"


def security_lines(
    status: CallStatus,
    *,
    verification: Verification,
    route: str | None = None,
    sas_confirmed: bool = False,
) -> list[tuple[str, str]]:
    """The security panel: (label, value) rows, no key bytes (only key_IDs).

    Args:
        status: the call's live status.
        verification: the peer's verification state.
        route: the QKD route (own SAE and KME → peer's KME and SAE), if known.
        sas_confirmed: the user pressed confirm-SAS in this call.
    """
    policy = status.policy or "—"
    if status.policy == "pqc":
        policy += " (no QKD: ML-KEM + DTLS only)"
    sas = status.sas or "—"
    if sas_confirmed:
        sas += "  ✔ confirmed"
    elif status.sas:
        sas += "  (read it aloud; press v if it matches)"
    rows = [
        ("peer", f"{status.peer}: {verification.symbol}"),
        ("policy", policy),
        ("suite", f"{status.kem} + {status.signature}, {_or_dash(status.srtp_profile)}"),
        ("SAS", sas),
        ("QKD key_IDs", ", ".join(status.qkd_key_ids) or "—"),
        ("QKD route", route or "—"),
        (
            "rekeys",
            f"{status.rekeys} (epoch {status.epoch}, failures {status.rekey_failures})",
        ),
    ]
    if status.notice:
        rows.append(("notice", status.notice))
    if status.error:
        rows.append(("error", status.error))
    return rows


def network_lines(status: CallStatus) -> list[tuple[str, str]]:
    """The network panel: the media path (ICE pair), RTT, jitter, loss, the jitter buffer."""
    return [
        ("media path", status.ice.describe() if status.ice is not None else "—"),
        ("RTT", _or_dash(status.rtt_ms, " ms")),
        ("jitter", _or_dash(status.jitter_ms, " ms")),
        ("lost", _or_dash(status.packets_lost, " packets")),
        ("jitter buffer", _or_dash(status.playout_delay_ms, " ms")),
        ("concealed", _or_dash(status.frames_concealed, " frames")),
        ("late", _or_dash(status.packets_late, " packets")),
        ("decrypt failures", str(status.decrypt_failures)),
    ]
