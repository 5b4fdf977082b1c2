"""Fuzzing a running ETSI GS QKD 014 KME server over mutual TLS.

Seeded hostile requests (tests/fuzz.py) against :class:`KMEServer` on
loopback: random and mutated methods, paths (SAE IDs with Unicode, percent
escapes, dot segments, NUL), query strings and JSON bodies of ``status``,
``enc_keys`` and ``dec_keys``, from an attached SAE, an attached SAE without
a key pool, and an authenticated SAE that is not attached. Every answer must
be JSON: a well-formed success of the endpoint (clause 6.1/6.3) or the spec's
Error object (clause 6.5) with a 4xx/503 status, never a 500 or a crash; and
the server keeps serving a real ``enc_keys`` → ``dec_keys`` exchange.
Raw malformed HTTP/1.1 over TLS must get an HTTP error answer or a close.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import re
import ssl
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote

import aiohttp
import pytest
from yarl import URL

from qcall.exceptions import KMEError, QKDError
from qcall.qkd.etsi014 import (
    API_PREFIX,
    parse_key_container,
    parse_key_ids,
    parse_key_request,
    parse_status,
)
from qcall.qkd.kme import KME, random_keys
from qcall.qkd.pki import PKIPaths, client_ssl_context, create_pki, server_ssl_context
from qcall.qkd.server import KMEServer
from qcall.typing import SAEId
from tests.fuzz import INTERESTING_TEXTS, Mutator
from tests.utils import TIMEOUT_FACTOR

SEED = int(os.environ.get("QCALL_FUZZ_SEED", "20261127"))
REQUESTS = int(os.environ.get("QCALL_FUZZ_KME_REQUESTS", "3000"))
RAW_REQUESTS = 200
T = 10.0 * TIMEOUT_FACTOR
METHODS = ("GET",) * 6 + ("POST",) * 6 + ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "HEAD")
ALLOWED = frozenset({200, 400, 401, 404, 405, 413, 503})


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKIPaths:
    return create_pki(tmp_path_factory.mktemp("pki"), ["kme-a"], ["alice", "bob", "carol", "eve"])


@pytest.fixture
async def server(pki: PKIPaths) -> AsyncIterator[KMEServer]:
    kme = KME("kme-a", max_key_per_request=8, max_key_count=100_000)
    kme.supply("alice", "bob", random_keys(3000), role="local")
    kme.add_sae("eve")
    ctx = server_ssl_context(pki.kmes["kme-a"].cert, pki.kmes["kme-a"].key, pki.ca_cert)
    async with KMEServer(kme, "127.0.0.1", 0, ctx) as srv:
        yield srv


def sae_ctx(pki: PKIPaths, sae: str) -> ssl.SSLContext:
    return client_ssl_context(pki.saes[sae].cert, pki.saes[sae].key, pki.ca_cert)


VALID_BODIES = [
    b"{}",
    b'{"number": 2, "size": 256}',
    b'{"number": 1, "size": 256, "additional_slave_SAE_IDs": ["carol"],'
    b' "extension_mandatory": [{"x": 1}], "extension_optional": [{"y": 2}]}',
    b'{"key_IDs": [{"key_ID": "9a1b2c3d-0000-4000-8000-000000000001"},'
    b' {"key_ID": "9a1b2c3d-0000-4000-8000-000000000002", "key_ID_extension": {}}],'
    b' "key_IDs_extension": {}}',
]
VALID_QUERIES = [
    b"",
    b"number=2&size=256",
    b"key_ID=9a1b2c3d-0000-4000-8000-000000000001",
    b"key_ID=9a1b2c3d-0000-4000-8000-000000000001&key_ID=9a1b2c3d-0000-4000-8000-000000000002",
]
ENDPOINTS = ("status", "enc_keys", "dec_keys")


def hostile_path(mutator: Mutator) -> str:
    """An encoded path under (or near) the API prefix."""
    rnd = mutator.random
    sae = rnd.choice(["bob", "alice", "eve", "carol", "nobody"])
    endpoint = rnd.choice(ENDPOINTS)
    r = rnd.random()
    if r < 0.3:
        sae = rnd.choice(INTERESTING_TEXTS) or "x"
    elif r < 0.4:
        sae = rnd.choice(["..", ".", "%2e%2e", "%00", "a%2Fb", "%ff%fe", "%", "%zz", "b" * 5000])
    elif r < 0.5:
        endpoint = rnd.choice(["", "status/", "enc_keys/x", "ENC_KEYS", "dec_keys%00", "keys"])
    elif r < 0.6:
        raw = mutator.havoc(f"{API_PREFIX}/{sae}/{endpoint}".encode(), 2)
        return "/" + quote(raw.lstrip(b"/"), safe="/%.-_~!$&'()*+,;=:@")
    return f"{API_PREFIX}/{quote(sae, safe='%.')}/{quote(endpoint, safe='/%')}"


def check_answer(status: int, content_type: str, raw: bytes, path: str) -> str:
    """Check one answer; return a short label for the statistics."""
    assert status in ALLOWED, (status, path, raw[:200])
    assert content_type == "application/json", (status, content_type, path, raw[:200])
    body = json.loads(raw, parse_constant=lambda name: pytest.fail(f"{name} in a KME answer"))
    if status == 200:
        endpoint = path.rsplit("/", 1)[-1]
        if endpoint == "status":
            parse_status(body)
        else:
            assert set(body) == {"keys"}, body
            for item in body["keys"]:
                assert set(item) == {"key_ID", "key"}
                assert len(base64.b64decode(item["key"], validate=True)) == 32
        return f"200 {endpoint}"
    # 6.5 Error: a message string, optional details list, nothing else.
    assert isinstance(body, dict) and isinstance(body.get("message"), str), body
    assert set(body) <= {"message", "details"}, body
    assert isinstance(body.get("details", []), list), body
    return f"{status} {body['message'][:40]}"


async def fuzz_client(
    server: KMEServer, session: aiohttp.ClientSession, seed: int, count: int
) -> collections.Counter[str]:
    mutator = Mutator(seed, VALID_BODIES)
    rnd = mutator.random
    stats: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        method = rnd.choice(METHODS)
        path = hostile_path(mutator)
        query = rnd.choice(VALID_QUERIES)
        if rnd.random() < 0.4:
            query = mutator.havoc(query or b"number=1")
        query_text = quote(query, safe="=&%+;,/:@")
        body = mutator.mutate() if rnd.random() < 0.7 else rnd.choice(VALID_BODIES)
        if rnd.random() < 0.005:
            body = b'{"number": 1, "pad": "' + b"x" * (70 * 1024) + b'"}'  # above MAX_BODY
        url = URL(server.url + path + ("?" + query_text if query_text else ""), encoded=True)
        headers = {"Content-Type": rnd.choice(["application/json", "text/plain", 'a/b; x="y"'])}
        async with session.request(
            method, url, data=body if method != "GET" else None, headers=headers
        ) as resp:
            raw = await resp.read()
            if method == "HEAD":  # no body: the status and type still follow the rules
                assert resp.status in ALLOWED and resp.content_type == "application/json"
                stats[f"HEAD {resp.status}"] += 1
                continue
            stats[check_answer(resp.status, resp.content_type, raw, url.path)] += 1
    return stats


RAW_CORPUS = [
    b"GET /api/v1/keys/bob/status HTTP/1.1\r\nHost: kme\r\n\r\n",
    b"POST /api/v1/keys/bob/enc_keys HTTP/1.1\r\nHost: kme\r\nContent-Type: application/json\r\n"
    b'Content-Length: 13\r\n\r\n{"number": 1}',
    b"GET /api/v1/keys/bob/dec_keys?key_ID=9a1b2c3d-0000-4000-8000-000000000001 HTTP/1.1\r\n"
    b"Host: kme\r\n\r\n",
    b"POST /api/v1/keys/bob/enc_keys HTTP/1.1\r\nHost: kme\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n',
]


async def raw_request(server: KMEServer, ctx: ssl.SSLContext, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
    try:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        # TLS has no half-close: a request whose Content-Length promises more
        # body keeps the server waiting for it, as HTTP/1.1 says.
        return await asyncio.wait_for(reader.read(65536), 0.5)
    except TimeoutError:
        return b"waiting"
    except (ConnectionError, ssl.SSLError):
        return b""  # closed by the server: a clean refusal
    finally:
        writer.close()
        with __import__("contextlib").suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def real_exchange(server: KMEServer, pki: PKIPaths) -> None:
    """A well-behaved enc_keys → dec_keys exchange between alice and bob."""
    api = f"{server.url}{API_PREFIX}"
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=sae_ctx(pki, "alice"))) as a,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=sae_ctx(pki, "bob"))) as b,
    ):
        async with a.post(f"{api}/bob/enc_keys", json={"number": 2}) as resp:
            assert resp.status == 200
            keys = (await resp.json())["keys"]
        ids = {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
        async with b.post(f"{api}/alice/dec_keys", json=ids) as resp:
            assert resp.status == 200
            assert (await resp.json())["keys"] == keys


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 404),
        ("GET", f"{API_PREFIX}/bob/dec_keys%00", 404),
        ("GET", f"{API_PREFIX}/bob/status/extra", 404),
        ("DELETE", f"{API_PREFIX}/bob/enc_keys", 405),
        ("POST", f"{API_PREFIX}/bob/status", 405),
    ],
)
async def test_routing_errors_are_spec_errors(
    server: KMEServer, pki: PKIPaths, method: str, path: str, status: int
) -> None:
    """Regression: aiohttp answered unknown paths and methods in text/plain."""
    connector = aiohttp.TCPConnector(ssl=sae_ctx(pki, "alice"))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, URL(server.url + path, encoded=True)) as resp,
    ):
        assert resp.status == status
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert set(body) == {"message"} and body["message"]
        if status == 405:
            assert "GET" in resp.headers["Allow"] or "POST" in resp.headers["Allow"]


@pytest.mark.slow
async def test_hostile_requests_get_spec_answers(server: KMEServer, pki: PKIPaths) -> None:
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=sae_ctx(pki, sae)))
        for sae in ("alice", "alice", "eve", "carol")
    ]
    try:
        shares = [REQUESTS // len(sessions)] * len(sessions)
        shares[0] += REQUESTS - sum(shares)
        results = await asyncio.gather(
            *(
                fuzz_client(server, s, SEED * 10 + i, n)
                for i, (s, n) in enumerate(zip(sessions, shares, strict=True))
            ),
            real_exchange(server, pki),
        )
    finally:
        for s in sessions:
            await s.close()
    stats: collections.Counter[str] = collections.Counter()
    for result in results[:-1]:
        assert result is not None
        stats.update(result)
    print(f"\n{sum(stats.values())} requests: {stats.most_common(25)}")
    assert sum(stats.values()) == REQUESTS
    assert not any(label.startswith("503") for label in stats), "a request hit a server bug"
    await real_exchange(server, pki)


@pytest.mark.slow
async def test_raw_malformed_http_is_refused_cleanly(server: KMEServer, pki: PKIPaths) -> None:
    mutator = Mutator(SEED + 7, RAW_CORPUS)
    ctx = sae_ctx(pki, "alice")
    statuses: collections.Counter[str] = collections.Counter()
    inputs = [mutator.havoc(mutator.random.choice(RAW_CORPUS)) for _ in range(RAW_REQUESTS)]
    answers: list[bytes] = []
    for lo in range(0, RAW_REQUESTS, 25):  # in parallel: some wait for a promised body
        answers += await asyncio.gather(
            *(raw_request(server, ctx, d) for d in inputs[lo : lo + 25])
        )
    for answer in answers:
        if answer in (b"", b"waiting"):
            statuses[answer.decode() or "closed"] += 1
            continue
        assert re.match(rb"HTTP/\d\.\d \d{3} ", answer), answer[:100]
        status = int(answer[9:12])
        assert status in ALLOWED | {414, 431, 501}, answer[:300]
        # even what aiohttp cannot parse is answered with the Error JSON (6.5)
        assert b"\r\nContent-Type: application/json" in answer.split(b"\r\n\r\n")[0], answer[:300]
        statuses[str(status)] += 1
    print(f"\nraw: {dict(statuses)}")
    await real_exchange(server, pki)  # still serving


def test_mutated_json_bodies_raise_only_kme_errors() -> None:
    """The four ETSI 014 body parsers (6.1-6.4) on 8,000 mutated real bodies."""
    kme = KME("kme-a", max_key_per_request=8)
    kme.supply("alice", "bob", random_keys(4), role="local")
    status = kme.status(SAEId("alice"), "bob").to_json()
    container = kme.enc_keys(SAEId("alice"), "bob", parse_key_request({"number": 2}), 0.0)
    bodies = {
        "status": json.dumps(status).encode(),
        "container": json.dumps(container.to_json()).encode(),
        "request": VALID_BODIES[2],
        "ids": VALID_BODIES[3],
    }
    parsers: dict[str, Callable[[object], object]] = {
        "status": parse_status,
        "container": lambda d: parse_key_container(d, expected_number=2, expected_size=256),
        "request": parse_key_request,
        "ids": parse_key_ids,
    }
    mutator = Mutator(SEED + 9, list(bodies.values()))
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(8000):
        kind = mutator.random.choice(list(bodies))
        raw = mutator.mutate() if mutator.random.random() < 0.2 else bodies[kind]
        if raw is bodies[kind]:
            raw = mutator.structured(json.loads(raw))
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            continue  # not JSON: the shells answer "not valid JSON" before parsing
        try:
            parsers[kind](data)
        except QKDError as exc:  # KMEResponseError (answers), KMEBadRequestError (requests)
            assert not isinstance(exc, KMEError) or exc.status == 400, exc
            outcomes[f"{kind} {type(exc).__name__}"] += 1
        else:
            outcomes[f"{kind} ok"] += 1
    print(dict(outcomes))
    assert sum(v for k, v in outcomes.items() if "Error" in k) > 4000


def test_misplaced_key_is_not_echoed_in_errors() -> None:
    """Regression: a key in the key_ID (or SAE ID) place was quoted into the message."""
    secret = base64.b64encode(os.urandom(32)).decode()
    body = {"keys": [{"key_ID": secret, "key": "9a1b2c3d-0000-4000-8000-000000000001"}]}
    with pytest.raises(QKDError) as info:
        parse_key_container(body)
    assert "not a UUID" in str(info.value) and secret[:16] not in str(info.value)
    with pytest.raises(QKDError) as info:
        parse_key_request({"additional_slave_SAE_IDs": [secret + "/"]})
    assert "not a valid ID" in str(info.value) and secret[:16] not in str(info.value)
