"""STUN/TURN servers for hosts behind NAT (``--ice-server``, ``[[ice_servers]]``).

A real call through the lab of tests/test_call_session.py, with a small STUN
server (RFC 5389 Binding, answered with XOR-MAPPED-ADDRESS) on loopback: both
phones' ICE agents must ask it for their server-reflexive address, and the
call must still come up hybrid-keyed.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import pytest
from aioice import stun

from qcall.call.session import CallOptions
from qcall.cli.settings import ice_servers_config
from qcall.exceptions import CallError, ConfigError
from tests.test_call_session import Lab, connect, lab  # noqa: F401 (the lab fixture)


class StunServer(asyncio.DatagramProtocol):
    """Answers STUN Binding requests with the address they came from."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            request = stun.parse_message(data)
        except ValueError:
            return
        if (request.message_method, request.message_class) != (
            stun.Method.BINDING,
            stun.Class.REQUEST,
        ):
            return
        self.requests.append(addr)
        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=request.transaction_id,
        )
        response.attributes["XOR-MAPPED-ADDRESS"] = addr
        assert self.transport is not None
        self.transport.sendto(bytes(response), addr)


@pytest.mark.slow
async def test_call_uses_the_configured_stun_server(lab: Lab) -> None:  # noqa: F811
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(StunServer, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        ice = [{"urls": f"stun:127.0.0.1:{port}"}]
        options = CallOptions(rekey_interval=None, ice_servers=ice)
        alice = await lab.phone("alice", tone=440, options=options)
        bob = await lab.phone("bob", options=options)
        caller, callee = await connect(alice, bob)
        assert caller.status.policy == callee.status.policy == "hybrid"
        assert caller.status.qkd_key_ids == callee.status.qkd_key_ids
        # Both ICE agents asked the server (from their own sockets).
        assert len(set(server.requests)) >= 2
        # A direct path (no TURN): the report names the pair, neither side relayed.
        for session in (caller, callee):
            await session.refresh_stats()
            path = session.status.ice
            assert path is not None and not path.relayed and path.policy == "all", path
            assert session.status.as_dict()["ice"]["local_candidate_type"] in ("host", "srflx")
        await caller.hangup()
    finally:
        transport.close()


async def test_relay_policy_without_a_turn_server_fails_clearly(lab: Lab) -> None:  # noqa: F811
    # Without a TURN server aioice gathers nothing and the call would hang: it is refused.
    options = CallOptions(rekey_interval=None, ice_policy="relay",
                          ice_servers=[{"urls": "stun:127.0.0.1:3478"}])  # fmt: skip
    alice = await lab.phone("alice", tone=440, options=options)
    await lab.phone("bob", options=options)
    with pytest.raises(CallError, match="ICE policy relay needs a TURN server"):
        await asyncio.wait_for(alice.call("bob"), 15)


def _args(*urls: str) -> argparse.Namespace:
    return argparse.Namespace(ice_server=list(urls) or None)


def test_ice_servers_from_flags_then_config() -> None:
    conf: dict[str, Any] = {
        "ice_servers": [
            {"urls": "turn:turn.example.org:3478", "username": "u", "credential": "p"},
            {"urls": "stun:stun.example.org"},
        ]
    }
    assert ice_servers_config(_args(), {}) == []
    assert ice_servers_config(_args(), conf) == conf["ice_servers"]
    assert ice_servers_config(_args("stun:a.example:3478"), conf) == [
        {"urls": "stun:a.example:3478"}
    ]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["stun:x"], r"ice_servers\[0\]: must be a table"),
        ([{"urls": "http://x"}], r"ice_servers\[0\]\.urls: 'http://x' is not"),
        ([{"urls": "stun:x", "colour": "red"}], r"ice_servers\[0\]\.colour: unknown"),
        ([{"urls": "stun:x"}, {"urls": "turn:x"}], r"ice_servers\[1\]: a TURN server needs"),
        ([{"urls": "stun:x", "username": 3}], r"ice_servers\[0\]\.username"),
    ],
)
def test_bad_ice_servers_name_the_entry(entries: list[Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ice_servers_config(_args(), {"ice_servers": entries})


def test_config_file_accepts_ice_servers(tmp_path: Path) -> None:
    from qcall.cli.settings import load_config

    path = tmp_path / "config.toml"
    path.write_text('[[ice_servers]]\nurls = "stun:stun.example.org:3478"\n', encoding="utf-8")
    conf = load_config(path, tmp_path)
    assert ice_servers_config(_args(), conf) == [{"urls": "stun:stun.example.org:3478"}]
