"""A small organisation, its members' homes and a transparency log, for the seal tests."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qcall import pqc
from qcall.identity import Identity
from qcall.org import Authority, OrgTrust
from qcall.seal.log import TransparencyLog
from qcall.seal.logformat import LogKey
from qcall.seal.service import LocalLog, SealHome, Signer
from qcall.seal.statement import Kind, Policy, SignedStatement, Statement
from tests.utils import TIMEOUT_FACTOR as T

ROOT = Path(__file__).resolve().parent.parent

NOW = datetime.datetime.now(datetime.UTC)


@dataclass
class World:
    """``org`` certifies every member; every home trusts ``org`` and ``log``."""

    root: Path
    org: Authority
    log: TransparencyLog
    homes: dict[str, Path] = field(default_factory=dict)
    signers: dict[str, Signer] = field(default_factory=dict)

    @property
    def logs(self) -> dict[bytes, LogKey]:
        return {self.log.log_id: self.log.log_key}

    @property
    def sink(self) -> LocalLog:
        return LocalLog(self.log)

    def trust(self, name: str = "verifier") -> OrgTrust:
        """The trust store of ``name``'s home (a fresh verifier by default)."""
        trust = OrgTrust.in_home(self.root / name)
        if not trust.exists():
            trust.trust((self.org.directory / "authority.pem").read_bytes())
        trust.update_crl((self.org.directory / "crl.pem").read_bytes())
        return trust

    def add_member(self, name: str, **kwargs: object) -> Signer:
        home = self.root / name
        home.mkdir(mode=0o700, exist_ok=True)
        identity = Identity.generate(name)
        identity.save(home)
        member = self.org.issue(name, identity.public_key, **kwargs)  # type: ignore[arg-type]
        trust = self.trust(name)
        trust.install(self.org.issued_path(member.serial).read_bytes(), identity.public_key)
        SealHome(home).trust_log(self.log.log_key, url="https://127.0.0.1:1", tls_ca=None)
        self.homes[name] = home
        self.signers[name] = Signer.load(home)
        return self.signers[name]

    def revoke(self, name: str, reason: str = "key-compromise", **kwargs: object) -> None:
        self.org.revoke(self.signers[name].member.serial, reason, **kwargs)  # type: ignore[arg-type]
        self.log.trust.update_crl((self.org.directory / "crl.pem").read_bytes())  # type: ignore[union-attr]


def make_world(root: Path, members: tuple[str, ...] = ("alice", "bob", "carol")) -> World:
    org = Authority.create(root / "authority", "Hefei Municipal")
    log = TransparencyLog.create(root / "log", "test log")
    assert log.trust is not None
    log.trust.trust(pqc.x509_pem(org.certificate))
    log.trust.update_crl((org.directory / "crl.pem").read_bytes())
    world = World(root, org, log)
    for name in members:
        world.add_member(name)
    return world


def write_document(path: Path, text: str = "contract: 1000 yuan") -> bytes:
    path.write_text(text)
    return hashlib.sha384(text.encode()).digest()


def statement(
    signer: Signer,
    kind: Kind = Kind.SEAL,
    *,
    document_hash: bytes = b"\x11" * 48,
    now_ms: int | None = None,
    policy: Policy | None = None,
    seal_digest: bytes = b"",
    previous: bytes = b"",
    reason: str = "approved",
) -> SignedStatement:
    """A signed statement by ``signer``, logged now."""
    s = Statement(
        kind,
        document_hash,
        "contract.txt",
        now_ms if now_ms is not None else int(time.time() * 1000),
        reason,
        signer.chain_ids,
        policy,
        seal_digest,
        previous,
    )
    return signer.sign(s)


async def start_log(directory: Path, *extra: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qcall", "seal-log", "serve", str(directory), "--port", "0",
        *(extra or ("--no-tls",)),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30 * T)).decode()
        assert line, "the log exited before serving"
        if "serving " in line:
            return proc, line.split("serving ")[1].strip()
