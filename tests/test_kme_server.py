"""ETSI GS QKD 014 conformance of the KME server, and our client against it.

Everything runs over real HTTPS with mutual TLS on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qcall.exceptions import (
    KMEBadRequestError,
    KMEConnectionError,
    KMEUnauthorizedError,
    KMEUnavailableError,
)
from qcall.qkd.client import ETSI014Client, open_key_source
from qcall.qkd.kme import KME, random_keys
from qcall.qkd.pki import PKIPaths, client_ssl_context, create_pki, server_ssl_context
from qcall.qkd.server import KMEServer
from qcall.typing import KeyId

STATUS_FIELDS = {
    "source_KME_ID",
    "target_KME_ID",
    "master_SAE_ID",
    "slave_SAE_ID",
    "key_size",
    "stored_key_count",
    "max_key_count",
    "max_key_per_request",
    "max_key_size",
    "min_key_size",
    "max_SAE_ID_count",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKIPaths:
    return create_pki(
        tmp_path_factory.mktemp("pki"), ["kme-a", "kme-b"], ["alice", "bob", "carol", "eve"]
    )


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PKIPaths:
    return create_pki(tmp_path_factory.mktemp("other"), ["kme-x"], ["alice"], ca_name="rogue")


def sae_ctx(pki: PKIPaths, sae: str) -> ssl.SSLContext:
    return client_ssl_context(pki.saes[sae].cert, pki.saes[sae].key, pki.ca_cert)


def kme_ctx(pki: PKIPaths, kme_id: str) -> ssl.SSLContext:
    return server_ssl_context(pki.kmes[kme_id].cert, pki.kmes[kme_id].key, pki.ca_cert)


@pytest.fixture
async def server(pki: PKIPaths) -> AsyncIterator[KMEServer]:
    kme = KME("kme-a", max_key_per_request=8, max_key_count=1000)
    kme.supply("alice", "bob", random_keys(20), role="local")
    kme.add_sae("eve")  # attached, but shares no pool with alice or bob
    async with KMEServer(kme, "127.0.0.1", 0, kme_ctx(pki, "kme-a")) as srv:
        yield srv


@pytest.fixture
async def sessions(pki: PKIPaths) -> AsyncIterator[dict[str, aiohttp.ClientSession]]:
    """Raw HTTP sessions per SAE, to check the wire format exactly."""
    out = {
        sae: aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=sae_ctx(pki, sae)))
        for sae in ("alice", "bob", "carol", "eve")
    }
    yield out
    for s in out.values():
        await s.close()


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    async with session.request(method, url, **kwargs) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


def api(server: KMEServer, sae: str, endpoint: str) -> str:
    return f"{server.url}/api/v1/keys/{sae}/{endpoint}"


# --- 5.1 Get status ------------------------------------------------------------------


async def test_status(server: KMEServer, sessions: dict[str, aiohttp.ClientSession]) -> None:
    status, body = await call(sessions["alice"], "GET", api(server, "bob", "status"))
    assert status == 200
    assert set(body) == STATUS_FIELDS
    assert body["source_KME_ID"] == body["target_KME_ID"] == "kme-a"
    assert (body["master_SAE_ID"], body["slave_SAE_ID"]) == ("alice", "bob")
    assert body["stored_key_count"] == 20 and body["key_size"] == 256
    assert body["max_key_per_request"] == 8 and body["max_key_count"] == 1000
    assert (body["min_key_size"], body["max_key_size"]) == (64, 4096)


async def test_status_alarm(server: KMEServer, pki: PKIPaths) -> None:
    server.kme.set_alarm("alice", "bob", "QBER above threshold on link L3", qber=0.31)
    async with ETSI014Client(server.url, sae_ctx(pki, "alice")) as client:
        status = await client.status("bob")
    assert status.alarm == "QBER above threshold on link L3" and status.qber == 0.31


# --- 5.2 Get key / 5.3 Get key with key IDs ------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_enc_then_dec_keys(
    server: KMEServer, sessions: dict[str, aiohttp.ClientSession], method: str
) -> None:
    if method == "POST":
        kw: dict[str, Any] = {"json": {"number": 3, "size": 256}}
    else:
        kw = {"params": {"number": "3", "size": "256"}}
    status, body = await call(sessions["alice"], method, api(server, "bob", "enc_keys"), **kw)
    assert status == 200
    assert len(body["keys"]) == 3
    for item in body["keys"]:
        assert set(item) == {"key_ID", "key"}
        assert str(uuid.UUID(item["key_ID"])) == item["key_ID"]
        assert len(base64.b64decode(item["key"], validate=True)) == 32
    ids = [k["key_ID"] for k in body["keys"]]
    if method == "POST":
        kw = {"json": {"key_IDs": [{"key_ID": i} for i in ids]}}
    else:
        kw = {"params": [("key_ID", i) for i in ids]}
    status, dec = await call(sessions["bob"], method, api(server, "alice", "dec_keys"), **kw)
    assert status == 200
    assert dec["keys"] == body["keys"]
    # each key is delivered once to each side, then erased
    status, again = await call(sessions["bob"], method, api(server, "alice", "dec_keys"), **kw)
    assert status == 400
    assert again["message"] == "key_ID not found"
    assert {d["key_ID"] for d in again["details"]} == set(ids)


async def test_default_number_is_one(
    server: KMEServer, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    status, body = await call(sessions["alice"], "POST", api(server, "bob", "enc_keys"), json={})
    assert status == 200 and len(body["keys"]) == 1
    status, body = await call(sessions["alice"], "GET", api(server, "bob", "enc_keys"))
    assert status == 200 and len(body["keys"]) == 1


@pytest.mark.parametrize(
    ("method", "endpoint", "kwargs", "message"),
    [
        ("POST", "enc_keys", {"json": {"size": 8192}}, "size 8192 is not supported"),
        ("POST", "enc_keys", {"json": {"size": 260}}, "size 260 is not a multiple of 8"),
        ("POST", "enc_keys", {"json": {"number": 9}}, "number 9 is not in 1..8"),
        ("POST", "enc_keys", {"json": {"number": 0}}, "number must be at least 1"),
        ("POST", "enc_keys", {"json": {"number": "1"}}, "number must be an integer"),
        ("POST", "enc_keys", {"json": [1]}, "Key request must be a JSON object"),
        ("POST", "enc_keys", {"data": b"{nope"}, "request body is not valid JSON"),
        ("POST", "enc_keys", {"data": b"\xff\xfe"}, "request body is not valid JSON"),
        ("POST", "enc_keys", {"data": b"[" * 60_000}, "request body is not valid JSON"),
        (
            "POST",
            "enc_keys",
            {"json": {"additional_slave_SAE_IDs": ["carol"]}},
            "additional_slave_SAE_IDs is not supported (max_SAE_ID_count is 0)",
        ),
        (
            "POST",
            "enc_keys",
            {"json": {"extension_mandatory": [{"abc_route_type": "direct"}]}},
            "not all extension_mandatory parameters are supported",
        ),
        ("GET", "enc_keys", {"params": {"number": "x"}}, "number must be an integer"),
        ("GET", "enc_keys", {"params": {"size": "-8"}}, "size must be an integer"),
        ("GET", "enc_keys", {"params": {"colour": "red"}}, "unknown query parameter"),
        ("GET", "enc_keys", {"params": [("number", "1"), ("number", "2")]}, "more than once"),
    ],
)
async def test_enc_keys_errors(
    server: KMEServer,
    sessions: dict[str, aiohttp.ClientSession],
    method: str,
    endpoint: str,
    kwargs: dict[str, Any],
    message: str,
) -> None:
    status, body = await call(sessions["alice"], method, api(server, "bob", endpoint), **kwargs)
    assert status == 400
    assert message in body["message"]
    assert server.kme.stored_key_count("alice", "bob") == 20  # nothing consumed


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("POST", {"json": {}}, "key_IDs is missing"),
        ("POST", {"json": {"key_IDs": []}}, "key_IDs is empty"),
        ("POST", {"json": {"key_IDs": [{"key_ID": "123"}]}}, "not a UUID"),
        ("POST", {"data": b"]"}, "request body is not valid JSON"),
        ("GET", {}, "key_ID is missing"),
        ("GET", {"params": {"key_ID": "zz"}}, "not a UUID"),
        ("GET", {"params": {"key_IDs": "zz"}}, "unknown query parameter"),
        ("POST", {"json": {"key_IDs": [{"key_ID": str(uuid.uuid4())}]}}, "key_ID not found"),
    ],
)
async def test_dec_keys_errors(
    server: KMEServer,
    sessions: dict[str, aiohttp.ClientSession],
    method: str,
    kwargs: dict[str, Any],
    message: str,
) -> None:
    status, body = await call(sessions["bob"], method, api(server, "alice", "dec_keys"), **kwargs)
    assert status == 400
    assert message in body["message"]


async def test_duplicate_key_ids(
    server: KMEServer, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    kid = str(uuid.uuid4())
    for kw in (
        {"json": {"key_IDs": [{"key_ID": kid}, {"key_ID": kid}]}},
        {"params": [("key_ID", kid), ("key_ID", kid)]},
    ):
        method = "POST" if "json" in kw else "GET"
        status, body = await call(sessions["bob"], method, api(server, "alice", "dec_keys"), **kw)
        assert status == 400 and "duplicate key_ID" in body["message"]


async def test_empty_pool_is_503(
    server: KMEServer, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    for _ in range(20 // 5):
        status, _ = await call(
            sessions["alice"], "POST", api(server, "bob", "enc_keys"), json={"number": 5}
        )
        assert status == 200
    status, body = await call(sessions["alice"], "POST", api(server, "bob", "enc_keys"), json={})
    assert status == 503
    assert body["message"] == "not enough keys: 0 stored, 1 requested"


async def test_unknown_sae_is_400_and_unattached_sae_is_401(
    server: KMEServer, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    status, body = await call(sessions["alice"], "GET", api(server, "nobody", "status"))
    assert status == 400 and body["message"] == "slave_SAE_ID nobody is not known to this KME"
    status, body = await call(sessions["eve"], "POST", api(server, "bob", "enc_keys"), json={})
    assert status == 400  # eve is attached but has no pool with bob
    status, body = await call(sessions["carol"], "GET", api(server, "bob", "status"))
    assert status == 401 and body["message"] == "SAE is not registered at this KME"
    # authorization comes before the body is even looked at
    for method, endpoint, kw in (
        ("POST", "enc_keys", {"data": b"{bad"}),
        ("GET", "enc_keys", {"params": {"number": "x"}}),
        ("POST", "dec_keys", {"json": {}}),
        ("GET", "dec_keys", {}),
    ):
        status, body = await call(sessions["carol"], method, api(server, "alice", endpoint), **kw)
        assert status == 401, (method, endpoint)


async def test_only_the_slave_can_dec_keys(
    server: KMEServer, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    _, body = await call(sessions["alice"], "POST", api(server, "bob", "enc_keys"), json={})
    kid = body["keys"][0]["key_ID"]
    req = {"json": {"key_IDs": [{"key_ID": kid}]}}
    for sae, master in (("eve", "alice"), ("alice", "bob"), ("alice", "alice")):
        status, _ = await call(sessions[sae], "POST", api(server, master, "dec_keys"), **req)
        assert status == 400, sae
    status, dec = await call(sessions["bob"], "POST", api(server, "alice", "dec_keys"), **req)
    assert status == 200 and dec["keys"] == body["keys"]


async def test_wrong_paths_and_methods(
    server: KMEServer, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    async with sessions["alice"].get(server.url + "/api/v1/keys/bob/other") as resp:
        assert resp.status == 404
    async with sessions["alice"].post(api(server, "bob", "status")) as resp:
        assert resp.status == 405
    async with sessions["alice"].post(api(server, "bob", "enc_keys"), data=b"x" * 100_000) as resp:
        assert resp.status == 400
        assert "larger than" in (await resp.json())["message"]


async def test_keeps_serving_after_garbage(server: KMEServer, pki: PKIPaths) -> None:
    import asyncio

    # raw garbage on a TLS connection, then a half-sent request that is dropped
    ctx = sae_ctx(pki, "alice")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
    writer.write(b"\x00\x01GARBAGE\r\n\r\n")
    await writer.drain()
    await reader.read(1000)
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
    writer.write(b"POST /api/v1/keys/bob/enc_keys HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
    await writer.drain()
    writer.close()
    async with ETSI014Client(server.url, ctx) as client:
        assert len(await client.get_keys("bob", 2)) == 2


# --- mutual TLS --------------------------------------------------------------------


REFUSED = "refused our client certificate"


async def test_missing_client_certificate_refused(server: KMEServer, pki: PKIPaths) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    async with ETSI014Client(server.url, ctx, timeout=5) as client:
        with pytest.raises(KMEConnectionError, match=REFUSED):
            await client.status("bob")


@pytest.mark.parametrize("tls", ["1.3", "1.2"])
async def test_foreign_client_certificate_refused(
    server: KMEServer, pki: PKIPaths, other_pki: PKIPaths, tls: str
) -> None:
    """The error says what happened: the KME refused our certificate, which file, why it may."""
    # a certificate for "alice" from another CA, trusting the right server CA
    foreign = other_pki.saes["alice"]
    ctx = client_ssl_context(foreign.cert, foreign.key, pki.ca_cert)
    if tls == "1.2":  # the KME refuses in the handshake itself
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with ETSI014Client(server.url, ctx, timeout=5, certificate=foreign.cert) as client:
        for attempt in (client.get_key("bob"), client.get_keys_by_id("alice", [str(uuid.uuid4())])):
            with pytest.raises(KMEConnectionError) as info:
                await attempt
            text = str(info.value)
            assert f"KME {server.url} {REFUSED} {foreign.cert} in the TLS handshake" in text
            assert "CA the KME does not trust" in text and "expired" in text
            assert "client certificate (extendedKeyUsage clientAuth)" in text
            assert "ServerDisconnected" not in text
    # the same through a configuration, which names the file
    config = {"url": server.url, "cert": foreign.cert, "key": foreign.key, "ca": pki.ca_cert}
    async with open_key_source(config) as source:
        with pytest.raises(KMEConnectionError, match=f"{REFUSED} {foreign.cert}"):
            await source.status("bob")
    assert server.kme.stored_key_count("alice", "bob") == 20


async def test_dropped_connection_is_not_called_a_refusal(pki: PKIPaths) -> None:
    """A KME that accepted our certificate but drops a request is not said to refuse it."""
    kme = KME("kme-a")
    kme.supply("alice", "bob", random_keys(2), role="local")

    def hang_up(request: aiohttp.web.Request) -> None:  # after TLS, before any answer
        assert request.transport is not None
        request.transport.close()

    async with (
        KMEServer(kme, "127.0.0.1", 0, kme_ctx(pki, "kme-a"), identify=hang_up) as srv,
        ETSI014Client(srv.url, sae_ctx(pki, "alice"), timeout=5) as alice,
    ):
        with pytest.raises(KMEConnectionError) as info:
            await alice.status("bob")
    assert REFUSED not in str(info.value)
    assert f"KME {srv.url} closed the connection without answering status" in str(info.value)


async def test_server_verified_by_client(
    server: KMEServer, pki: PKIPaths, other_pki: PKIPaths
) -> None:
    ctx = client_ssl_context(pki.saes["alice"].cert, pki.saes["alice"].key, other_pki.ca_cert)
    async with ETSI014Client(server.url, ctx, timeout=5) as client:
        with pytest.raises(KMEConnectionError, match="certificate"):
            await client.status("bob")
    good = sae_ctx(pki, "alice")
    async with ETSI014Client(server.url, good, server_name="kme-a") as client:
        assert (await client.status("bob")).source_kme_id == "kme-a"
    async with ETSI014Client(server.url, good, server_name="kme-b", timeout=5) as client:
        with pytest.raises(KMEConnectionError, match="certificate"):
            await client.status("bob")


# --- the client against the server ----------------------------------------------------


async def test_client_error_mapping_against_server(server: KMEServer, pki: PKIPaths) -> None:
    async with ETSI014Client(server.url, sae_ctx(pki, "alice")) as alice:
        with pytest.raises(KMEBadRequestError, match="size 8192 is not supported") as info:
            await alice.get_key("bob", 8192)
        assert info.value.status == 400 and info.value.message
        with pytest.raises(KMEBadRequestError, match="not known"):
            await alice.get_key("nobody")
        await alice.get_keys("bob", 8)
        await alice.get_keys("bob", 8)
        with pytest.raises(KMEUnavailableError):
            await alice.get_keys("bob", 8)
    async with ETSI014Client(server.url, sae_ctx(pki, "carol")) as carol:
        with pytest.raises(KMEUnauthorizedError):
            await carol.status("bob")


@contextlib.asynccontextmanager
async def two_kmes(
    pki: PKIPaths, keys: list[tuple[KeyId, bytes]], method: str, **options: int
) -> AsyncIterator[tuple[KME, ETSI014Client, ETSI014Client]]:
    """kme-a (alice, master) and kme-b (bob, slave) supplied alike; yield kme-b and the SAEs."""
    kme_a, kme_b = KME("kme-a", **options), KME("kme-b", **options)
    kme_a.supply("alice", "bob", keys, role="master", peer_kme_id="kme-b")
    kme_b.supply("alice", "bob", keys, role="slave", peer_kme_id="kme-a")
    async with (
        KMEServer(kme_a, "127.0.0.1", 0, kme_ctx(pki, "kme-a")) as srv_a,
        KMEServer(kme_b, "127.0.0.1", 0, kme_ctx(pki, "kme-b")) as srv_b,
        ETSI014Client(srv_a.url, sae_ctx(pki, "alice"), method=method) as alice,
        ETSI014Client(srv_b.url, sae_ctx(pki, "bob"), method=method) as bob,
    ):
        yield kme_b, alice, bob


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_two_kmes(pki: PKIPaths, method: str) -> None:
    async with two_kmes(pki, random_keys(10), method) as (_, alice, bob):
        status = await bob.status("alice")
        assert (status.source_kme_id, status.target_kme_id) == ("kme-a", "kme-b")
        got = await alice.get_keys("bob", 3)
        back = await bob.get_keys_by_id("alice", [k.key_id for k in reversed(got)])
        assert [k.key for k in back] == [k.key for k in reversed(got)]
        with pytest.raises(KMEBadRequestError):
            await bob.get_key_by_id("alice", got[0].key_id)
        assert (await alice.status("bob")).stored_key_count == 7


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_key_sizes_from_one_pool_across_two_kmes(pki: PKIPaths, method: str) -> None:
    """128-, 512-, 72- and 1024-bit keys: cut from the same pool bytes, each byte once."""
    keys = random_keys(8)  # 8 x 256 bits = 256 bytes
    stream = b"".join(k for _, k in keys)
    sizes = {"min_key_size": 64, "max_key_size": 1024}
    async with two_kmes(pki, keys, method, **sizes) as (kme_b, alice, bob):
        for status in (await alice.status("bob"), await bob.status("alice")):
            assert (status.key_size, status.min_key_size, status.max_key_size) == (256, 64, 1024)
        got = [await alice.get_key("bob", bits) for bits in (128, 512, 256, 72)]
        got += await alice.get_keys("bob", 1, 1024)
        assert [k.size_bits for k in got] == [128, 512, 256, 72, 1024]
        # exact accounting: 249 bytes taken, in order, none twice
        assert b"".join(k.key for k in got) == stream[:249]
        assert (await alice.status("bob")).stored_key_count == 0  # 7 bytes left
        with pytest.raises(KMEUnavailableError, match="not enough keys: 0 of 64 bits"):
            await alice.get_key("bob", 64)
        with pytest.raises(KMEBadRequestError, match="size 1032 is not supported"):
            await alice.get_key("bob", 1032)
        with pytest.raises(KMEBadRequestError, match="size 56 is not supported"):
            await alice.get_key("bob", 56)
        # bob's KME finds every key from its key_ID alone, in any order, once
        ids = [k.key_id for k in reversed(got)]
        back = await bob.get_keys_by_id("alice", ids[:2])
        back += await bob.get_keys_by_id("alice", ids[2:])
        assert [k.key for k in back] == [k.key for k in reversed(got)]
        for key in got:
            with pytest.raises(KMEBadRequestError, match="key_ID not found"):
                await bob.get_key_by_id("alice", key.key_id)
        assert kme_b.stored_key_count("alice", "bob") == 0


async def test_over_long_get_dec_keys_gets_the_error_json(
    server: KMEServer, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    """aiohttp refuses a long request line before any handler: still the Error object (6.5)."""
    ids = "&".join(f"key_ID={uuid.uuid4()}" for _ in range(1600))  # 70 KB
    status, body = await call(sessions["bob"], "GET", api(server, "alice", "dec_keys") + "?" + ids)
    assert status == 400
    assert body == {
        "message": "request line or header longer than 65536 bytes (send many key_IDs with POST)"
    }
    status, _ = await call(sessions["alice"], "GET", api(server, "bob", "status"))
    assert status == 200  # and it keeps serving


async def test_get_dec_keys_is_refused_or_served_whole_never_truncated(pki: PKIPaths) -> None:
    """More key_IDs than max_key_per_request: refused, nothing consumed; up to it: all served."""
    kme = KME("kme-a", max_key_per_request=1100, max_key_count=2000)
    kme.supply("alice", "bob", random_keys(1100), role="local")
    ctx_a, ctx_b = sae_ctx(pki, "alice"), sae_ctx(pki, "bob")
    async with (
        KMEServer(kme, "127.0.0.1", 0, kme_ctx(pki, "kme-a")) as srv,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx_a)) as alice,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx_b)) as bob,
    ):
        status, body = await call(alice, "POST", api(srv, "bob", "enc_keys"), json={"number": 1100})
        assert status == 200
        ids = [k["key_ID"] for k in body["keys"]]
        url = api(srv, "alice", "dec_keys")
        extra = [*ids, str(uuid.uuid4())]
        status, refusal = await call(bob, "GET", url, params=[("key_ID", k) for k in extra])
        assert status == 400
        assert refusal == {"message": "1101 key_IDs requested, max_key_per_request is 1100"}
        status, got = await call(bob, "GET", url, params=[("key_ID", k) for k in ids])
        assert status == 200
        assert got == body  # all 1100, in order: none was consumed by the refusal


async def test_open_key_source_etsi014(server: KMEServer, pki: PKIPaths) -> None:
    paths = pki.saes["alice"]
    config = {"url": server.url, "cert": paths.cert, "key": paths.key, "ca": pki.ca_cert}
    async with open_key_source(config) as source:
        assert isinstance(source, ETSI014Client)
        key = await source.get_key("bob")
        assert key.size_bits == 256
    async with open_key_source({**config, "type": "etsi014", "method": "get"}) as source:
        assert (await source.status("bob")).stored_key_count == 19


def test_sae_cert_paths_exist(pki: PKIPaths) -> None:
    assert all(Path(p.cert).exists() for p in pki.saes.values())


async def test_random_garbage_bodies(
    server: KMEServer, sessions: dict[str, aiohttp.ClientSession]
) -> None:
    import random

    rng = random.Random(1)
    bodies = [rng.randbytes(rng.randrange(0, 200)) for _ in range(30)]
    bodies += [b'{"number": 1e999}', b'{"number": null}', b'{"key_IDs": [null]}', b'"x"']
    for body in bodies:
        for sae, peer, endpoint in (("alice", "bob", "enc_keys"), ("bob", "alice", "dec_keys")):
            status, answer = await call(
                sessions[sae], "POST", api(server, peer, endpoint), data=body
            )
            assert status in (200, 400), body
            assert status == 200 or answer["message"]
    async with sessions["alice"].get(api(server, "bob", "status")) as resp:
        assert resp.status == 200
