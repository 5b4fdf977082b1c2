"""One-time-pad calls (policy ``otp``): information-theoretically secure media.

Layers, bottom up (docs/otp.md):

* :mod:`qcall.otp.mac` — the Wegman–Carter one-time MAC (pure).
* :mod:`qcall.otp.packet` — the OTP media packet transform and its pads (pure).
* :mod:`qcall.otp.keystream` — the key-stream manager: key blocks agreed by
  ETSI GS QKD 014 key_IDs over the call's control channel (Sans-I/O).
* :mod:`qcall.otp.capacity` — how many OTP calls a link's key rate sustains (pure).
* :mod:`qcall.otp.media` — the aiortc shell on a call's DTLS transport.
"""
