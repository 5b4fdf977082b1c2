"""Stand-in for liboqs-python's ``oqs`` package: see :mod:`oqs.oqs` here."""

from oqs.oqs import (
    OQS_SUCCESS,
    OQS_VERSION,
    KeyEncapsulation,
    MechanismNotSupportedError,
    Signature,
    get_enabled_kem_mechanisms,
    get_enabled_sig_mechanisms,
    oqs_version,
)

__all__ = [
    "OQS_SUCCESS",
    "OQS_VERSION",
    "KeyEncapsulation",
    "MechanismNotSupportedError",
    "Signature",
    "get_enabled_kem_mechanisms",
    "get_enabled_sig_mechanisms",
    "oqs_version",
]
