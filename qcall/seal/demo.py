"""The seal part of ``qcall demo``: a document sealed, approved by bob, verified offline.

:func:`run_seal_demo` builds a throw-away organisation ("Hefei Municipal", ML-DSA-87)
that certifies alice and bob, starts a transparency log served over HTTPS on
loopback, lets alice seal a document asking for bob's approval, lets bob approve
it, and verifies the final bundle offline as a third party would (authority
certificate, CRL and log key only). It takes well under a second.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run_seal_demo"]

DOCUMENT = "Beijing-Hefei quantum link: maintenance budget 2027, 1,200,000 yuan.\n"


async def run_seal_demo(directory: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run the seal demo; return the ``seal`` section of the demo report.

    Keys: ``verified``, ``log_size``, ``inclusion_verified``, ``workflow``,
    ``sealed_by``, ``approved_by``, ``bundle_bytes``, ``seconds`` (and ``failures``).
    """
    from qcall import pqc
    from qcall.identity import Identity
    from qcall.org import Authority, OrgTrust
    from qcall.qkd.pki import create_pki
    from qcall.seal.log import TransparencyLog
    from qcall.seal.logclient import LogClient, client_tls_context
    from qcall.seal.logserver import LogServer, server_tls_context
    from qcall.seal.service import Signer, decide, hash_file, seal_document
    from qcall.seal.statement import Mode, Policy
    from qcall.seal.verify import verify_bundle

    t0 = time.monotonic()
    tmp = None
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="qcall-seal-demo-")
        directory = tmp.name
    root = Path(directory)
    try:
        now = datetime.datetime.now(datetime.UTC)
        org = Authority.create(root / "authority", "Hefei Municipal", now=now)
        signers = {}
        for name, role in (("alice", "engineer"), ("bob", "finance director")):
            identity = Identity.generate(name)
            member = org.issue(name, identity.public_key, department="Operations", role=role)
            signers[name] = Signer(identity, member, org.certificate)
        ca_pem = pqc.x509_pem(org.certificate)
        crl_pem = (org.directory / Authority.CRL_FILE).read_bytes()
        log = TransparencyLog.create(root / "log", "Hefei seal log")
        assert log.trust is not None
        log.trust.trust(ca_pem)
        log.trust.update_crl(crl_pem)
        tls = create_pki(root / "tls", ["seal-log"], [])
        server_ctx = server_tls_context(
            str(tls.kmes["seal-log"].cert), str(tls.kmes["seal-log"].key)
        )
        verifier = OrgTrust(root / "verifier")
        verifier.trust(ca_pem)
        verifier.update_crl(crl_pem)
        logs = {log.log_id: log.log_key}
        document = root / "budget-2027.txt"
        document.write_text(DOCUMENT)
        try:
            async with (
                LogServer(log, "127.0.0.1", 0, server_ctx) as server,
                LogClient(server.url, log.log_key, client_tls_context(str(tls.ca_cert))) as client,
            ):
                bundle = await seal_document(
                    signers["alice"], document, client, logs,
                    reason="please approve the maintenance budget",
                    policy=Policy(Mode.ORDERED, 1, ("bob",)),
                )  # fmt: skip
                bundle, _, _ = await decide(
                    signers["bob"], bundle, verifier, client, logs, approve=True,
                    reason="approved", document_hash=hash_file(document),
                )  # fmt: skip
        finally:
            log.close()
        # The auditor: the bundle, the document, the authority and the log key; no network.
        report = verify_bundle(bundle, verifier, logs, document_hash=hash_file(document))
        return {
            "verified": report.ok,
            "log_size": max(h.tree_size for h in report.tree_heads()),
            "inclusion_verified": report.inclusion_verified,
            "workflow": report.workflow,
            "sealed_by": report.seal.member.describe() if report.seal.member else None,
            "approved_by": [d.signer for d in report.decisions if d.kind == "approve"],
            "signature": f"{signers['alice'].member.scheme.value} (statements), ML-DSA-87 "
            "(authority, log)",
            "bundle_bytes": len(bundle.serialize()),
            "seconds": round(time.monotonic() - t0, 3),
            "failures": [f"{f.cause}: {f.message}" for f in report.failures],
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
