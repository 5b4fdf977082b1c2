"""qcall: quantum-secured voice calls.

Every call's SRTP master keys come from a hybrid of QKD-delivered key material
and an ML-KEM handshake, authenticated with ML-DSA identities.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
