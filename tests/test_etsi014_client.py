"""The ETSI 014 client against a deliberately misbehaving fake KME (raw aiohttp app).

The fake answers whatever each test sets, so the client's error mapping is
tested against the specification, not against our own server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from qcall.exceptions import (
    ConfigError,
    KMEBadRequestError,
    KMEConnectionError,
    KMEError,
    KMEResponseError,
    KMEUnauthorizedError,
    KMEUnavailableError,
)
from qcall.qkd.client import ETSI014Client, open_key_source
from qcall.qkd.etsi014 import KeyRequest
from tests.utils import MS

Handler = Callable[[web.Request], Any]


class FakeKME:
    """A raw aiohttp app; ``handler`` decides every answer; requests are recorded."""

    def __init__(self) -> None:
        self.handler: Handler = lambda request: web.json_response({})
        self.requests: list[tuple[str, str, Any]] = []
        self.peers: set[object] = set()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.method, request.path_qs, json.loads(body) if body else None))
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))
        result = self.handler(request)
        if asyncio.iscoroutine(result):
            result = await result
        assert isinstance(result, web.StreamResponse)
        return result

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = next(a[1] for a in self.runner.addresses if isinstance(a, tuple))
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
async def fake() -> AsyncIterator[FakeKME]:
    kme = FakeKME()
    await kme.start()
    yield kme
    await kme.runner.cleanup()


@pytest.fixture
async def client(fake: FakeKME) -> AsyncIterator[ETSI014Client]:
    async with ETSI014Client(fake.url, timeout=2000 * MS) as c:
        yield c


def keys_json(*items: tuple[str, bytes]) -> dict[str, Any]:
    return {"keys": [{"key_ID": k, "key": base64.b64encode(v).decode()} for k, v in items]}


def new_id() -> str:
    return str(uuid.uuid4())


async def test_requests_follow_the_spec(fake: FakeKME, client: ETSI014Client) -> None:
    kid = new_id()
    fake.handler = lambda r: web.json_response(keys_json((kid, bytes(32))))
    await client.get_key("SAE_B", 256)
    await client.get_key_by_id("SAE_A", kid)
    assert fake.requests == [
        ("POST", "/api/v1/keys/SAE_B/enc_keys", {"number": 1, "size": 256}),
        ("POST", "/api/v1/keys/SAE_A/dec_keys", {"key_IDs": [{"key_ID": kid}]}),
    ]
    await client.enc_keys(
        "SAE_B",
        KeyRequest(number=1, extension_optional=({"abc": 1},), additional_slave_sae_ids=()),
    )
    assert fake.requests[-1][2] == {"number": 1, "extension_optional": [{"abc": 1}]}


async def test_get_method_uses_query(fake: FakeKME) -> None:
    kid = new_id()
    fake.handler = lambda r: web.json_response(keys_json((kid, bytes(16))))
    async with ETSI014Client(fake.url, method="GET") as c:
        await c.get_keys("B", 1, 128)
        await c.get_keys_by_id("A", [kid])
        with pytest.raises(ConfigError, match="needs POST"):
            await c.enc_keys("B", KeyRequest(extension_mandatory=({"x": 1},)))
    assert [r[:2] for r in fake.requests] == [
        ("GET", "/api/v1/keys/B/enc_keys?number=1&size=128"),
        ("GET", f"/api/v1/keys/A/dec_keys?key_ID={kid}"),
    ]


async def test_connection_reuse(fake: FakeKME, client: ETSI014Client) -> None:
    fake.handler = lambda r: web.json_response(keys_json((new_id(), bytes(32))))
    for _ in range(10):
        await client.get_key("B")
    assert len(fake.peers) == 1


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (web.Response(body=b"{not json", content_type="application/json"), "malformed JSON"),
        (web.Response(body=b"", status=200), "malformed JSON"),
        (web.json_response([1, 2]), "Key container must be a JSON object"),
        (web.json_response({"keys": [{"key_ID": "x", "key": "AAAA"}]}), "not a UUID"),
        (web.json_response({"keys": [{"key_ID": new_id(), "key": "%%"}]}), "not valid base64"),
        (web.json_response(keys_json((new_id(), bytes(16)))), "128 bits, requested 256"),
        (web.json_response(keys_json()), "returned 0 keys, requested 1"),
        (
            web.json_response(keys_json((new_id(), bytes(32)), (new_id(), bytes(32)))),
            "returned 2 keys, requested 1",
        ),
    ],
)
async def test_enc_keys_bad_answers(
    fake: FakeKME, client: ETSI014Client, answer: web.Response, match: str
) -> None:
    fake.handler = lambda r: answer
    with pytest.raises(KMEResponseError, match=match):
        await client.get_key("B", 256)


async def test_duplicate_key_ids(fake: FakeKME, client: ETSI014Client) -> None:
    kid = new_id()
    fake.handler = lambda r: web.json_response(keys_json((kid, bytes(32)), (kid, bytes(32))))
    with pytest.raises(KMEResponseError, match="twice"):
        await client.get_keys("B", 2)


async def test_dec_keys_missing_or_extra_ids(fake: FakeKME, client: ETSI014Client) -> None:
    wanted, other = new_id(), new_id()
    fake.handler = lambda r: web.json_response(keys_json((other, bytes(32))))
    with pytest.raises(KMEResponseError, match=f"did not return key_ID {wanted}"):
        await client.get_key_by_id("A", wanted)
    fake.handler = lambda r: web.json_response(keys_json((wanted, bytes(32)), (other, bytes(32))))
    with pytest.raises(KMEResponseError, match="not requested"):
        await client.get_key_by_id("A", wanted)


async def test_bad_status(fake: FakeKME, client: ETSI014Client) -> None:
    fake.handler = lambda r: web.json_response({"source_KME_ID": "A"})
    with pytest.raises(KMEResponseError, match="target_KME_ID is missing"):
        await client.status("B")


async def test_400_with_spec_error(fake: FakeKME, client: ETSI014Client) -> None:
    error = {
        "message": "not all extension_mandatory parameters are supported",
        "details": [{"extension_mandatory_unsupported": "abc_route_type is not supported"}],
    }
    fake.handler = lambda r: web.json_response(error, status=400)
    with pytest.raises(KMEBadRequestError) as info:
        await client.get_key("B")
    assert info.value.status == 400
    assert info.value.message == error["message"]
    assert info.value.details == error["details"]
    assert error["message"] in str(info.value)


async def test_400_with_garbage_body(fake: FakeKME, client: ETSI014Client) -> None:
    fake.handler = lambda r: web.Response(status=400, text="<html>oops</html>")
    with pytest.raises(KMEBadRequestError) as info:
        await client.get_key("B")
    assert info.value.message is None and info.value.details == []


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, KMEUnauthorizedError), (503, KMEUnavailableError), (500, KMEError), (404, KMEError)],
)
async def test_status_codes(
    fake: FakeKME, client: ETSI014Client, status: int, cls: type[KMEError]
) -> None:
    fake.handler = lambda r: web.json_response({"message": "no"}, status=status)
    with pytest.raises(cls) as info:
        await client.status("B")
    assert type(info.value) is cls
    assert info.value.status == status and info.value.message == "no"


async def test_timeout(fake: FakeKME) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({})

    fake.handler = slow
    async with ETSI014Client(fake.url, timeout=200 * MS) as c:
        with pytest.raises(KMEConnectionError, match="did not answer within"):
            await c.get_key("B")


async def test_connection_dropped(fake: FakeKME, client: ETSI014Client) -> None:
    async def drop(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(0.01)
        return web.json_response({})

    fake.handler = drop
    with pytest.raises(KMEConnectionError):
        await client.get_key("B")


async def test_oversized_answer(fake: FakeKME, client: ETSI014Client) -> None:
    fake.handler = lambda r: web.Response(body=b" " * (5 * 1024 * 1024))
    with pytest.raises(KMEResponseError, match="larger than"):
        await client.get_key("B")


async def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with ETSI014Client(f"http://127.0.0.1:{port}") as c:
        with pytest.raises(KMEConnectionError, match="cannot connect"):
            await c.status("B")


async def test_bad_arguments(client: ETSI014Client) -> None:
    with pytest.raises(ConfigError):
        await client.status("a/b")
    with pytest.raises(ConfigError):
        await client.get_key_by_id("A", "not-a-uuid")
    with pytest.raises(ConfigError):
        await client.get_keys("B", 0)
    with pytest.raises(ConfigError):
        await client.get_keys_by_id("A", [])
    for url in ("ftp://x", "https://", "nope"):
        with pytest.raises(ConfigError):
            ETSI014Client(url)
    with pytest.raises(ConfigError, match="client certificate"):
        ETSI014Client("https://127.0.0.1:1")
    with pytest.raises(ConfigError, match="needs cert, key, ca"):
        open_key_source("https://127.0.0.1:1")
    with pytest.raises(ConfigError, match="unknown key source type"):
        open_key_source({"type": "etsi004"})
    with pytest.raises(ConfigError, match="no key source for URL scheme"):
        open_key_source("ftp://x")


async def test_oversized_streamed_answer(fake: FakeKME, client: ETSI014Client) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(5 * 16):
            await resp.write(b" " * 65536)
        return resp

    fake.handler = stream
    with pytest.raises(KMEResponseError, match="larger than"):
        await client.get_key("B")


async def test_key_id_text_is_kept(fake: FakeKME, client: ETSI014Client) -> None:
    upper = new_id().upper()
    fake.handler = lambda r: web.json_response(keys_json((upper, bytes(32))))
    (key,) = await client.get_keys("B")
    assert key.key_id == upper  # another KME may compare key_IDs as strings
    fake.handler = lambda r: web.json_response(keys_json((upper.lower(), bytes(32))))
    assert (await client.get_key_by_id("A", upper)).key_id == upper.lower()
    assert fake.requests[-1][2] == {"key_IDs": [{"key_ID": upper}]}


async def test_400_details_are_shown(fake: FakeKME, client: ETSI014Client) -> None:
    # A KME whose message is generic: the validation detail is what the user needs.
    error = {"message": "bad request", "details": [{"size": "must be a multiple of 8\x1b[2J"}]}
    fake.handler = lambda r: web.json_response(error, status=400)
    with pytest.raises(KMEBadRequestError) as info:
        await client.get_key("B", 257)
    assert "size: must be a multiple of 8" in str(info.value)
    assert "\x1b" not in str(info.value)  # the KME's text is untrusted: no control characters


def test_http_url_with_client_certificate_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"not https://.*mutual TLS"):
        ETSI014Client.from_config(
            {"url": "http://kme:8443", "cert": "a.pem", "key": "a.key", "ca": "ca.pem"}
        )


async def test_http_to_a_tls_kme_says_so(tmp_path: Any) -> None:
    from qcall.qkd.pki import create_pki, server_ssl_context

    paths = create_pki(tmp_path, ["K"], ["A"])
    tls = server_ssl_context(paths.kmes["K"].cert, paths.kmes["K"].key, paths.ca_cert)
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ETSI014Client(f"http://127.0.0.1:{port}", timeout=2000 * MS) as c:
            with pytest.raises(KMEConnectionError, match="https://"):
                await c.get_key("B")
    finally:
        server.close()
