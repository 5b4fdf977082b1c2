"""Quantum Cloud Seal: post-quantum electronic seals with a transparency log.

A seal is an ML-DSA signature (FIPS 204) by an organisation-certified identity
over a canonical statement about a document's SHA-384 hash; every statement is
recorded in an append-only Merkle tree log (RFC 9162) whose signed tree heads
let anyone verify, offline and years later, that it was logged and that the log
never rewrote its history. ``docs/seal.md`` specifies every byte.

Pure cores: :mod:`~qcall.seal.merkle` (RFC 9162 proofs),
:mod:`~qcall.seal.statement` (canonical statements and log entries),
:mod:`~qcall.seal.bundle` (the ``.qseal`` file), :mod:`~qcall.seal.verify`
(offline verification), :mod:`~qcall.seal.workflow` (approval rules).
Shells: :mod:`~qcall.seal.logstore` (SQLite), :mod:`~qcall.seal.logserver`
(HTTPS), :mod:`~qcall.seal.logclient`, :mod:`~qcall.seal.audit` (monitor),
:mod:`~qcall.seal.service` (what the CLI runs).
"""
