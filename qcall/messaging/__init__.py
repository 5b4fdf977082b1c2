"""Quantum Secret: end-to-end encrypted messages, groups and files (``docs/messaging.md``).

Pure cores (no I/O, time passed in as ``now``):

* :mod:`~qcall.messaging.wire` — the byte encoding every format uses;
* :mod:`~qcall.messaging.keyschedule` — HKDF-SHA-384 labels (``"qmsg1 "``), chains;
* :mod:`~qcall.messaging.prekeys` — ML-KEM-768 prekeys signed with ML-DSA identities;
* :mod:`~qcall.messaging.messages` — prekey and ratchet message formats;
* :mod:`~qcall.messaging.session` — set-up with no round trip (ML-KEM + optional QKD key);
* :mod:`~qcall.messaging.ratchet` — the double ratchet (chains, ML-KEM epochs, QKD generations);
* :mod:`~qcall.messaging.content` — what a message carries (text, files, receipts, groups);
* :mod:`~qcall.messaging.group` — groups: signed membership changes and sender keys;
* :mod:`~qcall.messaging.files` — chunked file encryption with resume.

Shells: :mod:`~qcall.messaging.store` (the client's SQLite store, encrypted at rest)
and :mod:`~qcall.messaging.client` (:class:`MessagingClient` over a transport).
"""
