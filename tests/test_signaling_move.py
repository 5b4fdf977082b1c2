"""Moving a name to a new key on the signaling server, signed by the previous key."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcall import pqc
from qcall.cli import main
from qcall.exceptions import SignalingAuthError, SignalingProtocolError
from qcall.identity import PREVIOUS_IDENTITY_DIR, Identity
from qcall.signaling.client import SignalingClient
from qcall.signaling.messages import Challenge, Register
from tests.test_signaling_server import start, url


def new_key() -> pqc.SigningKey:
    return pqc.get_backend().signing_generate(pqc.SignatureScheme.ML_DSA_65)


async def login(address: str, key: pqc.SigningKey, previous: pqc.SigningKey | None = None) -> str:
    client = SignalingClient(address, key, "alice", reconnect=False, previous_key=previous)
    try:
        await client.connect()
        return client.fingerprint
    finally:
        await client.close()


async def test_move_signed_by_the_previous_key() -> None:
    server = await start()
    try:
        address = url(server)
        old, new, mallory = new_key(), new_key(), new_key()
        await login(address, old)
        with pytest.raises(SignalingAuthError, match="another key"):
            await login(address, new)  # a new key alone cannot take the name
        with pytest.raises(SignalingAuthError, match="another key"):
            await login(address, new, previous=mallory)  # signed by a key not pinned
        fp = await login(address, new, previous=old)  # moved
        assert server.protocol._pins.fingerprint("alice") == fp  # type: ignore[arg-type]
        with pytest.raises(SignalingAuthError, match="another key"):
            await login(address, old)  # the old key no longer holds the name
        assert await login(address, new, previous=old) == fp  # later logins: no-op
        assert len(server.protocol._pins) == 1
    finally:
        await server.close()


def test_register_previous_fields_checked() -> None:
    challenge = Challenge(nonce=bytes(32), server_id="s", time=0)
    key, old = new_key(), new_key()
    message = Register.create(key, "alice", challenge, previous=old)
    assert Register.parse(message.serialize()) == message
    assert message.previous_key == old.public_bytes()
    text = message.serialize().replace('"previous_signature"', '"x"')
    with pytest.raises(SignalingProtocolError, match="go together"):
        Register.parse(text)


def test_identity_new_force_keeps_the_previous_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path)
    assert main(["--home", home, "identity", "new", "--name", "alice"]) == 0
    first = Identity.load(home)
    assert main(["--home", home, "identity", "new", "--name", "alice", "--force"]) == 0
    kept = Identity.load(tmp_path / PREVIOUS_IDENTITY_DIR)
    assert kept.public_key == first.public_key
    assert (tmp_path / PREVIOUS_IDENTITY_DIR / "identity.key").stat().st_mode & 0o077 == 0
    capsys.readouterr()
