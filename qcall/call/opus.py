"""Opus packets as long as the source's frames: 10 ms packets from a microphone.

aiortc's ``OpusEncoder`` (:data:`AIORTC_SUPPORTED`) regroups whatever it is
given into 20 ms frames (a resampler with ``frame_size=960``) and codes them
with libopus's ``voip`` application. A 20 ms packet is complete only when its
last sample has been captured, so the first sample of each packet waits 20 ms
before it can leave, and the ``voip`` (SILK + CELT) encoder adds 6.5 ms of
look-ahead: together about half of a 50 ms mouth-to-ear budget
(docs/audio.md, "Mouth-to-ear through the sound server").

:class:`SourceFramedOpusEncoder` packetizes by the source's own frame length:

* 20 ms frames (tones, files) are coded exactly as aiortc does (20 ms packets,
  ``voip``), so nothing changes for them;
* frames of 10 ms or less (:class:`~qcall.call.audio_devices.MicrophoneTrack`
  captures 10 ms blocks) become packets of that length (RFC 7587 §4.2 allows
  any Opus frame size; receivers need no signalling, the TOC byte says it,
  RFC 6716 §3.1), coded with libopus's restricted low-delay application
  (``lowdelay``: CELT only, 2.5 ms look-ahead instead of 6.5 ms; at aiortc's
  96 kbit/s CELT carries speech transparently).

:func:`install_opus_encoder` puts one on every audio sender of a peer
connection, per instance (never on the class): it wraps the sender's ``send``
so that the encoder is chosen once the negotiated codec is known, and only for
Opus (a PCMU call keeps aiortc's encoder). The hook touches one private
attribute, ``RTCRtpSender.__encoder``, which aiortc fills lazily with
``get_encoder(codec)`` at the first frame when it is still ``None``.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import av
from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.codecs.opus import OpusEncoder

from qcall.call.aiortc_compat import require_aiortc
from qcall.exceptions import CallError

__all__ = [
    "AIORTC_SUPPORTED",
    "LOW_DELAY_SAMPLES",
    "SourceFramedOpusEncoder",
    "install_opus_encoder",
]

logger = logging.getLogger(__name__)

#: aiortc releases whose ``codecs/opus.py`` and ``rtcrtpsender.py`` were read: 1.16.
AIORTC_SUPPORTED: Final = ((1, 16), (1, 17))

#: Opus frame sizes at 48 kHz (2.5, 5, 10, 20, 40 and 60 ms; RFC 6716 §2.1.4).
OPUS_FRAME_SAMPLES: Final = (120, 240, 480, 960, 1920, 2880)
#: Frames this long or shorter are coded with the ``lowdelay`` application.
LOW_DELAY_SAMPLES: Final = 480

_ENCODER_FIELD: Final = "_RTCRtpSender__encoder"
_ATTRIBUTE: Final = "_qcall_opus_encoder"


class SourceFramedOpusEncoder(OpusEncoder):
    """aiortc's Opus encoder, with packets as long as the first frame it is given.

    The packet length is fixed at the first frame (a later frame of another
    length is regrouped, as aiortc does). A first frame that is not an Opus
    frame size gives aiortc's 20 ms.
    """

    def __init__(self) -> None:
        super().__init__()
        self.frame_samples: int | None = None

    def _configure(self, samples: int) -> None:
        size = samples if samples in OPUS_FRAME_SAMPLES else 960
        self.frame_samples = size
        if size == 960:
            return  # exactly aiortc's encoder
        options = {"frame_duration": f"{size / 48:g}"}
        options["application"] = "lowdelay" if size <= LOW_DELAY_SAMPLES else "voip"
        self.codec.options = options
        self.resampler = av.AudioResampler(
            format="s16", layout="stereo", rate=48000, frame_size=size
        )
        logger.debug("< opus encoder: %g ms packets, %s", size / 48, options["application"])

    def encode(self, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        if self.frame_samples is None:
            self._configure(frame.samples)
        return super().encode(frame, force_keyframe)


def _hook_sender(sender: RTCRtpSender) -> None:
    if getattr(sender, _ATTRIBUTE, False):
        return
    if not hasattr(sender, _ENCODER_FIELD):
        raise CallError("aiortc's RTCRtpSender lacks __encoder: unsupported version")
    original = sender.send

    async def send(parameters: Any) -> None:
        codecs = getattr(parameters, "codecs", None) or []
        mime = str(getattr(codecs[0], "mimeType", "")).lower() if codecs else ""
        if mime == "audio/opus" and getattr(sender, _ENCODER_FIELD) is None:
            setattr(sender, _ENCODER_FIELD, SourceFramedOpusEncoder())
        await original(parameters)

    sender.send = send  # type: ignore[method-assign]
    setattr(sender, _ATTRIBUTE, True)


def install_opus_encoder(pc: RTCPeerConnection) -> None:
    """Give the audio senders of ``pc`` a :class:`SourceFramedOpusEncoder`.

    Call it after ``addTrack`` and before the descriptions are applied.
    Installing twice is harmless; other peer connections are untouched.

    Raises:
        CallError: an aiortc release this hook was not checked on.
    """
    require_aiortc(AIORTC_SUPPORTED, "Opus packetization", "use aiortc 1.16")
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "audio":
            _hook_sender(transceiver.sender)
