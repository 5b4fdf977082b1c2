"""One form of identity fingerprint everywhere: identity, contacts, handshake events, reports."""

from __future__ import annotations

import re
from pathlib import Path

from qcall.contacts import ContactStore
from qcall.handshake.protocol import key_fingerprint
from qcall.identity import Identity, fingerprint

FORM = re.compile(r"^[A-Z2-7]{4}( [A-Z2-7]{4}){12}$")


def test_one_fingerprint_form(tmp_path: Path) -> None:
    bob = Identity.generate("bob")
    public = bob.public_key
    shown = bob.to_public_dict()["fingerprint"]  # `qcall identity show`
    assert FORM.match(shown)
    store = ContactStore.in_home(tmp_path)
    store.check_peer("bob", public)
    contact = store.get("bob")
    assert contact is not None
    assert contact.fingerprint == shown  # `qcall contacts`
    # The handshake events fill the call report's peer_fingerprint with this function.
    assert key_fingerprint(public) == shown == fingerprint(public)
