"""Organisation authorities and member certificates: X.509 signed with ML-DSA.

The package has three modules: :mod:`~qcall.org.profile` (the certificate profile,
parsing hostile input), :mod:`~qcall.org.authority` (issuing and revoking) and
:mod:`~qcall.org.trust` (what a user trusts, and the checks calls and seals use).

An organisation (``qcall org init --name "Hefei Municipal"``) is an authority with an
ML-DSA-87 key and a self-signed X.509 certificate. It certifies its members' ML-DSA
identity keys (``qcall org issue``) with their name, department, role, a validity
period and a serial, and revokes them (``qcall org revoke``) in an X.509 CRL, all
signed with ML-DSA (pure, empty context, RFC 9881). ``docs/seal.md`` §3 gives the
profile (extensions, key usages) that :func:`parse_member` enforces.

Files of an authority (default ``<home>/org/authority/``)::

    authority.key    the 32-byte ML-DSA-87 seed ξ (mode 0600)
    authority.pem    its certificate
    crl.pem          the current CRL (rewritten by every revocation)
    registry.json    issued serials, revocations, the next CRL number
    issued/<SERIAL>.pem   each member certificate followed by the authority's

What a user trusts (:class:`OrgTrust`, ``<home>/org/``)::

    trusted/<FPR>.pem     authorities trusted with ``qcall org trust CA.pem``
    trusted/<FPR>.crl     their latest CRL (``qcall org crl-update``; only newer ones)
    certs/<FPR>.pem       member certificates known (own and colleagues')
    member.pem            the user's own certificate (``qcall org install``)

``FPR`` is the first 16 hex digits of the certificate's SHA-256. A certificate is
trusted when a trusted authority signed it, it follows the profile, the time that
matters (now for a call, the log-attested time for a seal) lies in its validity
period and in the authority's, and the authority's CRL does not revoke it at that
time: no trust on first use. Every failure is a typed
:class:`~qcall.exceptions.CertificateError` that says which check failed.
"""

from qcall.org.authority import Authority
from qcall.org.profile import (
    OID_DOCUMENT_SIGNING,
    REASONS,
    Member,
    Revocation,
    certificate_fingerprint,
    check_authority,
    from_millis,
    load_certificates,
    load_crl,
    member_public_key,
    parse_member,
    parse_serial,
)
from qcall.org.trust import OrgTrust

__all__ = [
    "OID_DOCUMENT_SIGNING",
    "REASONS",
    "Authority",
    "Member",
    "OrgTrust",
    "Revocation",
    "certificate_fingerprint",
    "check_authority",
    "from_millis",
    "load_certificates",
    "load_crl",
    "member_public_key",
    "parse_member",
    "parse_serial",
]
