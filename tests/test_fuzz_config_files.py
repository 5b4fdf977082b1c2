"""Fuzzing the file loaders: topology files (TOML and JSON) and the call config TOML.

Seeded mutations (tests/fuzz.py) of the bundled topologies
(docs/topology.md) and of a full ``config.toml`` (docs/calls.md) are written
to files and loaded: :func:`qcall.qkd.topology.load_topology` may only succeed
or raise :class:`TopologyError`, :func:`qcall.cli.call.load_config` only
succeed or raise :class:`ConfigError`; never another exception.
"""

from __future__ import annotations

import collections
import json
import os
import tomllib
from pathlib import Path

import pytest

from qcall.cli.settings import load_config
from qcall.exceptions import ConfigError, TopologyError
from qcall.qkd.topology import bundled_topologies, load_topology
from tests.fuzz import RAW_FRAGMENTS, Mutator

SEED = int(os.environ.get("QCALL_FUZZ_SEED", "20261127"))
TOPOLOGY_MUTATIONS = 2000
CONFIG_MUTATIONS = 2000
TOPOLOGIES = Path(__file__).resolve().parent.parent / "qcall" / "data" / "topologies"

CONFIG = b"""\
signaling = "ws://127.0.0.1:8765"
sae_id = "alice"
policy = "hybrid"
allow_pqc_only = false
rekey_interval = 30.0
fresh_kem = true
srtp_profile = "AEAD_AES_256_GCM"
network = "network.json"

[key_source]
type = "etsi014"
url = "https://127.0.0.1:8443"
cert = "alice.pem"
key = "alice.key"
ca = "ca.pem"
"""


def topology_corpus() -> list[tuple[str, bytes]]:
    out = []
    for name in bundled_topologies():
        text = (TOPOLOGIES / f"{name}.toml").read_bytes()
        out.append((".toml", text))
        out.append((".json", json.dumps(tomllib.loads(text.decode())).encode()))
    return out


def test_mutated_topology_files_raise_only_topology_errors(tmp_path: Path) -> None:
    corpus = topology_corpus()
    mutator = Mutator(SEED, [data for _, data in corpus])
    outcomes: collections.Counter[str] = collections.Counter()
    for i in range(TOPOLOGY_MUTATIONS):
        suffix, original = mutator.random.choice(corpus)
        data = mutator.havoc(original)
        if suffix == ".json" and mutator.random.random() < 0.6:
            obj = json.loads(original)
            if mutator.random.random() < 0.5:  # inside one node or link
                key = mutator.random.choice(["nodes", "links"])
                k = mutator.random.randrange(len(obj[key]))
                try:
                    obj[key][k] = json.loads(mutator.structured(obj[key][k]))
                except (ValueError, RecursionError):
                    pass  # the mutation was not JSON: use the byte-level one
                else:
                    data = json.dumps(obj).encode()
            else:
                data = mutator.structured(obj)
        path = tmp_path / f"t{i % 7}{suffix}"
        path.write_bytes(data)
        try:
            load_topology(path)
        except TopologyError as exc:
            assert str(exc)  # names what is wrong
            outcomes["TopologyError"] += 1
        else:
            outcomes["loaded"] += 1
    print(dict(outcomes))
    assert outcomes["TopologyError"] > TOPOLOGY_MUTATIONS // 2


def test_mutated_config_files_raise_only_config_errors(tmp_path: Path) -> None:
    mutator = Mutator(SEED + 1, [CONFIG])
    outcomes: collections.Counter[str] = collections.Counter()
    for i in range(CONFIG_MUTATIONS):
        r = mutator.random.random()
        if r < 0.2:  # a hostile value for one key
            line = mutator.random.choice(CONFIG.splitlines(keepends=True)[:8])
            key = line.split(b"=")[0]
            data = CONFIG.replace(line, key + b"= " + mutator.random.choice(RAW_FRAGMENTS) + b"\n")
        else:
            data = mutator.havoc(CONFIG)
        path = tmp_path / f"c{i % 7}.toml"
        path.write_bytes(data)
        try:
            conf = load_config(path, tmp_path)
        except ConfigError as exc:
            assert str(exc)
            outcomes["ConfigError"] += 1
        else:
            outcomes["loaded"] += 1
            assert isinstance(conf, dict)
    print(dict(outcomes))
    assert outcomes["ConfigError"] > CONFIG_MUTATIONS // 2


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 100_000 + "]" * 100_000,  # RecursionError in tomllib
        "policy = {a = " * 3000 + "1" + "}" * 3000,
        "rekey_interval = " + "1" * 5000,  # ValueError: beyond the int digit limit
    ],
)
def test_config_regressions(tmp_path: Path, text: str) -> None:
    """Found by the fuzzer: these escaped load_config as RecursionError/ValueError."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, tmp_path)
