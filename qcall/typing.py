"""Shared type aliases (``NewType``s keep key IDs, SAE IDs and peers apart)."""

from __future__ import annotations

from typing import NewType

__all__ = ["KeyId", "PeerId", "SAEId"]

#: An ETSI GS QKD 014 ``key_ID``: a UUID in its canonical text form.
KeyId = NewType("KeyId", str)

#: An ETSI GS QKD 014 SAE identifier (secure application entity).
SAEId = NewType("SAEId", str)

#: A user name on the signaling server.
PeerId = NewType("PeerId", str)
