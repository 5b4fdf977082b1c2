"""The real servers tests and demos start (signaling/local_services.py)."""

from __future__ import annotations

import os
import shutil
import socket
import struct

import psycopg
import pytest
import redis

from qcall.exceptions import ServiceError
from signaling.local_services import LocalPostgres, LocalRedis, LocalTurn


def test_redis_starts_stops_and_restarts(redis_server: LocalRedis) -> None:
    client = redis.Redis.from_url(redis_server.url)
    assert client.ping() and client.set("k", "v")
    redis_server.kill()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    redis_server.start()
    assert client.ping() and client.get("k") is None  # no persistence: a fresh server
    client.close()


def test_postgres_runs_unprivileged_and_keeps_data(postgres_server: LocalPostgres) -> None:
    url = postgres_server.create_database("services_test")
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE TABLE t (x INTEGER)")
        db.execute("INSERT INTO t VALUES (42)")
        row = db.execute("SELECT usesysid, current_user FROM pg_user WHERE usename = current_user")
        assert row.fetchone() is not None
    pid = int((postgres_server.data / "postmaster.pid").read_text().split()[0])
    uid = os.stat(f"/proc/{pid}").st_uid
    if os.geteuid() == 0:
        assert uid != 0  # PostgreSQL refuses root: it runs as nobody
    postgres_server.kill()
    postgres_server.start()
    with psycopg.connect(url) as db:
        assert db.execute("SELECT x FROM t").fetchone() == (42,)
    with pytest.raises(ServiceError, match="exists"):
        postgres_server.create_database("services_test")


def test_turnserver_answers_stun_and_hides_its_secret() -> None:
    if shutil.which("turnserver") is None:
        pytest.skip("turnserver is not installed here (apt-get install coturn)")
    with LocalTurn("s3cret-for-test") as turn:
        assert turn.proc is not None and isinstance(turn.proc.args, list)  # an argv
        assert "s3cret-for-test" not in " ".join(map(str, turn.proc.args))
        txid = os.urandom(12)
        request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + txid  # STUN Binding request
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(request, (turn.host, turn.port))
            answer = sock.recv(2048)
        assert struct.unpack("!H", answer[:2])[0] == 0x0101 and answer[8:20] == txid
    assert not turn.dir.exists()


def test_a_server_that_cannot_start_is_named() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed here (apt-get install redis-server)")
    with LocalRedis() as first:
        second = LocalRedis(port=first.port)  # the port is taken
        with pytest.raises(ServiceError, match=r"redis did not start .*"):
            second.start()
        second.close()
