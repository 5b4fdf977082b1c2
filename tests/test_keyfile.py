"""The pre-loaded key file source: once-only consumption, locking, crash safety."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from qcall.exceptions import ConfigError, InvalidKeyError, KeyExhaustedError, KeyNotFoundError
from qcall.qkd.client import open_key_source
from qcall.qkd.keyfile import KeyFile, KeyFileSource, create_key_files

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "alice.keys", tmp_path / "bob.keys"
    create_key_files("alice", a, "bob", b, 20)
    return a, b


def test_files_are_private_and_match(pair: tuple[Path, Path]) -> None:
    a, b = pair
    assert a.stat().st_mode & 0o777 == 0o600
    da, db = KeyFile(a).read(), KeyFile(b).read()
    assert (da["sae_id"], db["sae_id"]) == ("alice", "bob")
    assert da["keys"] == db["keys"] and len(da["keys"]) == 40


async def test_master_and_slave_get_the_same_key_once(pair: tuple[Path, Path]) -> None:
    a, b = pair
    async with open_key_source(f"keyfile:{a}") as alice, KeyFileSource(b) as bob:
        sent = await alice.get_key("bob")
        got = await bob.get_key_by_id("alice", sent.key_id)
        assert got == sent and got.key == sent.key
        with pytest.raises(KeyNotFoundError, match="already consumed"):
            await bob.get_key_by_id("alice", sent.key_id)
        # directions are split: Bob's own keys towards Alice are different ones
        back = await bob.get_key("alice")
        assert back.key_id != sent.key_id
        with pytest.raises(KeyNotFoundError, match="no key_ID"):
            await bob.get_key_by_id("alice", back.key_id)  # not from alice to bob
        status = await alice.status("bob")
        assert (status.stored_key_count, status.max_key_count, status.key_size) == (19, 20, 256)
    # the key bytes are erased from the file, the key_ID is kept as used
    entry = next(e for e in KeyFile(a).read()["keys"] if e["key_ID"] == sent.key_id)
    assert entry["used"] is True and "key" not in entry
    raw = a.read_bytes()
    assert base64.b64encode(sent.key) not in raw


def test_take_limits(pair: tuple[Path, Path]) -> None:
    kf = KeyFile(pair[0])
    with pytest.raises(ConfigError, match="256-bit keys, not 128"):
        kf.take("bob", 1, 128)
    with pytest.raises(KeyExhaustedError, match="20 unused keys for alice->bob, 21 requested"):
        kf.take("bob", 21)
    assert len(kf.take("bob", 20)) == 20  # the failed request consumed nothing
    with pytest.raises(KeyExhaustedError):
        kf.take("bob")
    with pytest.raises(KeyExhaustedError):
        kf.take("carol")
    with pytest.raises(ConfigError):
        kf.take_by_id("bob", ["not-a-uuid"])


def test_take_by_id_is_all_or_nothing(pair: tuple[Path, Path]) -> None:
    a, b = pair
    ids = [k.key_id for k in KeyFile(a).take("bob", 2)]
    with pytest.raises(KeyNotFoundError):
        KeyFile(b).take_by_id("alice", [ids[0], str(uuid.uuid4())])
    assert [k.key_id for k in KeyFile(b).take_by_id("alice", ids)] == ids


def test_open_key_source_config(pair: tuple[Path, Path]) -> None:
    assert isinstance(open_key_source({"type": "keyfile", "path": str(pair[0])}), KeyFileSource)
    assert isinstance(open_key_source(f"keyfile://{pair[0]}"), KeyFileSource)
    with pytest.raises(ConfigError):
        open_key_source({"type": "keyfile"})


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(format="x"), "format"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(sae_id="a/b"), "sae_id"),
        (lambda d: d.update(key_size=7), "key_size"),
        (lambda d: d.update(keys={}), "keys must be an array"),
        (lambda d: d["keys"].append(5), r"keys\[40\] must be an object"),
        (lambda d: d["keys"][3].update(key_ID="x"), r"keys\[3\].key_ID"),
        (lambda d: d["keys"][3].update(key_ID=d["keys"][2]["key_ID"]), "appears twice"),
        (lambda d: d["keys"][1].update(slave_SAE_ID=None), r"keys\[1\].slave_SAE_ID"),
        (lambda d: d["keys"][1].update(used="yes"), r"keys\[1\].used"),
        (lambda d: d["keys"][1].update(key="!!"), r"keys\[1\].key is not valid base64"),
        (lambda d: d["keys"][1].update(key="AAAA"), r"keys\[1\].key is not 256 bits"),
        (lambda d: d["keys"][1].pop("key"), r"keys\[1\].key must be"),
    ],
)
def test_malformed_files(pair: tuple[Path, Path], mutate: object, match: str) -> None:
    a = pair[0]
    data = json.loads(a.read_bytes())
    mutate(data)  # type: ignore[operator]
    a.write_text(json.dumps(data))
    with pytest.raises(InvalidKeyError, match=match) as info:
        KeyFile(a).take("bob")
    assert "AAAA" not in str(info.value)


def test_not_json_and_unsafe_mode(pair: tuple[Path, Path]) -> None:
    a = pair[0]
    a.write_bytes(b"\x00garbage")
    with pytest.raises(InvalidKeyError, match="not valid JSON"):
        KeyFile(a).read()
    b = pair[1]
    b.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by other users"):
        KeyFile(b).take("alice")


def test_concurrent_threads_never_share_a_key(tmp_path: Path) -> None:
    a = tmp_path / "a.keys"
    create_key_files("alice", a, "bob", tmp_path / "b.keys", 60)
    got: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        kf = KeyFile(a)
        while True:
            try:
                keys = kf.take("bob")
            except KeyExhaustedError:
                return
            with lock:
                got.extend(k.key_id for k in keys)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 60 and len(set(got)) == 60


CONSUMER = """
import sys
from qcall.exceptions import KeyExhaustedError
from qcall.qkd.keyfile import KeyFile
kf = KeyFile(sys.argv[1])
while True:
    try:
        (key,) = kf.take("bob")
    except KeyExhaustedError:
        break
    print(key.key_id, key.fingerprint, flush=True)
"""


def _consumer(path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", CONSUMER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def test_concurrent_processes_never_share_a_key(tmp_path: Path) -> None:
    a = tmp_path / "a.keys"
    create_key_files("alice", a, "bob", tmp_path / "b.keys", 60)
    procs = [_consumer(a) for _ in range(3)]
    lines: list[str] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        lines += out.split()[::2]
    assert len(lines) == 60 and len(set(lines)) == 60


def test_sigkill_never_reuses_a_key(tmp_path: Path) -> None:
    a = tmp_path / "a.keys"
    create_key_files("alice", a, "bob", tmp_path / "b.keys", 80)
    handed_out: dict[str, str] = {}
    kills = 0
    for _ in range(5):
        proc = _consumer(a)
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(8)]  # now it is mid-consumption
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        for line in lines + out.splitlines():
            parts = line.split()
            if len(parts) == 2:  # a line cut by the kill is not a handed-out key
                handed_out[parts[0]] = parts[1]
    assert len(handed_out) >= 40
    data = KeyFile(a).read()  # still a valid file
    used = {e["key_ID"] for e in data["keys"] if e.get("used")}
    assert set(handed_out) <= used  # every key handed out is marked used
    assert len(used) - len(handed_out) <= kills  # at most one key lost per kill
    rest = KeyFile(a).take("bob", 80 - len(used)) if len(used) < 80 else []
    assert not {k.key_id for k in rest} & set(handed_out)
    assert not {k.fingerprint for k in rest} & set(handed_out.values())
    # no temporary files left readable by others
    for leftover in tmp_path.iterdir():
        assert leftover.stat().st_mode & 0o077 == 0, leftover
