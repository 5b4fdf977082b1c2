"""An adaptive audio jitter buffer, and its installation into aiortc's receivers.

aiortc (:data:`AIORTC_CHECKED_VERSIONS`) gives each audio ``RTCRtpReceiver`` a
``JitterBuffer(capacity=16, prefetch=4)``. It has no clock: a frame leaves only
when a packet arrives and four complete frames follow it, so every frame waits
about 60-80 ms however calm the network is, and a lost packet stalls the audio
until 16 newer packets have pushed it out (≈ 320 ms of silence, then a burst).

:class:`AdaptiveJitterBuffer` is a Sans-I/O playout buffer driven by a clock
passed in (``now``), in the manner of WebRTC's NetEq and RFC 3550 section 6.4.1:

* **Playout schedule.** A frame with RTP timestamp ``ts`` (RFC 3550 §5.1) is
  due at ``ts / clock_rate + P``: ``P`` maps the sender's media clock to ours
  and includes the buffering delay. For every packet the buffer notes its
  *relative delay* ``r = arrival - ts / clock_rate``; over a sliding window of
  recent packets, ``P = max(min(r) + min_delay, quantile_q(r) + margin)``,
  capped at ``min(r) + max_delay``. So about ``1 - q`` of the packets arrive
  after their slot, and the buffer waits no longer than the network's recent
  delay variation needs.
* **Adaptation.** ``P`` grows at once (the audio pauses for the difference)
  when a late packet or a burst of jitter raises the quantile, and shrinks by at
  most ``shrink_rate`` seconds per second (frames leave up to 10 % faster) once
  the network is calm again, so the delay tracks the network without jumps.
* **Loss.** When a frame's slot comes and its packet has not, the buffer
  releases a concealment slot (``payload is None``) at the expected timestamp
  and moves on: the decoder fills it (Opus packet-loss concealment, RFC 6716
  §4.4), and a packet arriving after its slot is dropped as late. After
  ``max_conceal`` of concealment in a row with nothing buffered, the stream is
  taken as paused (DTX, hold) and the buffer waits for the next packet.
* **Order.** Frames leave in timestamp order whatever order packets arrived in;
  duplicates are dropped. Sequence numbers (16 bit) and timestamps (32 bit)
  are unwrapped (RFC 3550 Appendix A.1), so wrap-around is seamless.
* **Timestamp jumps.** A packet more than ``resync_threshold`` off the
  schedule (sender restart, new timeline) flushes the buffer and starts a new
  schedule; output ``pts`` stay continuous.

:func:`install_jitter_buffer` puts one in place of the stock buffer on given
receivers (per instance, never on the class, so a stock call in the same
process is untouched): aiortc then hands every depayloaded audio packet to it,
and a timer on the event loop releases frames to aiortc's decoder thread on
schedule, with a one-byte Opus packet (TOC only, RFC 6716 §3.2.1: a lost
frame) for each concealment slot. When that timer runs late by more than
:data:`STALL_THRESHOLD`, the event loop itself was blocked: the shell lets the
packets queued meanwhile in before concealing, and keeps their delays (which
measure this process, not the network) out of the statistics until a packet is
on time again. docs/jitter-buffer.md has the design and the measured latency.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame

from qcall.call.aiortc_compat import require_aiortc
from qcall.exceptions import CallError

__all__ = [
    "AIORTC_CHECKED_VERSIONS",
    "JITTER_BUFFER_MODES",
    "AdaptiveJitterBuffer",
    "JitterBufferConfig",
    "JitterBufferStats",
    "PlayoutFrame",
    "ReceiverJitterBuffer",
    "apply_jitter_buffer_mode",
    "conceal_payload",
    "get_jitter_buffer",
    "install_jitter_buffer",
]

logger = logging.getLogger(__name__)

#: aiortc versions whose ``rtcrtpreceiver.py`` / ``jitterbuffer.py`` were read for the glue.
AIORTC_CHECKED_VERSIONS: Final = ("1.16.0",)

#: Supported aiortc range, ``(lowest, first unsupported)``: ``>=1.16,<1.17``.
AIORTC_SUPPORTED: Final = ((1, 16), (1, 17))

#: ``CallOptions.jitter_buffer`` values: ``adaptive`` (this module) or ``stock``
#: (aiortc's own fixed prefetch, the harness's baseline).
JITTER_BUFFER_MODES: Final = ("adaptive", "stock")

#: A release timer running this late (seconds) means the event loop was blocked.
STALL_THRESHOLD: Final = 0.015
#: After such a stall: wait this long for the queued packets before concealing, and
STALL_DEFER: Final = 0.005
#: leave the packets read after it out of the delay statistics until one is on
#: time again (the backlog is through), or at most this long.
STALL_CATCH_UP: Final = 0.5

_ATTRIBUTE: Final = "_qcall_jitter_buffer"
_RECEIVER_FIELDS: Final = ("__jitter_buffer", "__decoder_queue", "__decoder_thread", "__codecs")

# RFC 3550 Appendix A.1: sequence numbers further behind than this are a restart.
_MAX_MISORDER: Final = 100

PayloadT = TypeVar("PayloadT")


# --- the Sans-I/O core ------------------------------------------------------------------


@dataclass(frozen=True)
class JitterBufferConfig:
    """Tuning of an :class:`AdaptiveJitterBuffer` (seconds unless stated).

    Attributes:
        clock_rate: RTP clock rate in Hz (Opus: 48000, RFC 7587 §4.1).
        frame_duration: frame length assumed until two packets show it.
        min_delay: least buffering beyond the fastest recent packet.
        max_delay: most buffering beyond the fastest recent packet.
        initial_delay: buffering before any statistics exist.
        quantile: fraction of packets the schedule aims to have on time.
        margin: added to the quantile of the relative delay.
        window: packets in the delay statistics (150 × 20 ms = 3 s): long
            enough for a stable 97th percentile, short enough to forget a burst.
        shrink_rate: fastest decrease of the delay, in seconds per second.
        max_conceal: longest run of concealment with nothing buffered.
        resync_threshold: a packet this far off schedule starts a new one.
        capacity: most packets held (more are dropped and counted).
    """

    clock_rate: int = 48000
    frame_duration: float = 0.020
    min_delay: float = 0.004
    max_delay: float = 0.400
    initial_delay: float = 0.020
    quantile: float = 0.97
    margin: float = 0.002
    window: int = 150
    shrink_rate: float = 0.10
    max_conceal: float = 0.200
    resync_threshold: float = 1.0
    capacity: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.clock_rate, int) or self.clock_rate <= 0:
            raise ValueError(f"clock_rate: expected a positive integer, got {self.clock_rate!r}")
        if not 0 < self.frame_duration <= 0.120:
            raise ValueError(f"frame_duration: {self.frame_duration!r} s is outside (0, 0.120]")
        if not 0 <= self.min_delay <= self.max_delay:
            raise ValueError(
                f"min_delay/max_delay: need 0 <= {self.min_delay!r} <= {self.max_delay!r}"
            )
        if not self.min_delay <= self.initial_delay <= self.max_delay:
            raise ValueError(f"initial_delay: {self.initial_delay!r} s is outside [min, max]")
        if not 0 < self.quantile <= 1:
            raise ValueError(f"quantile: {self.quantile!r} is outside (0, 1]")
        if self.margin < 0 or self.shrink_rate < 0 or self.max_conceal < 0:
            raise ValueError("margin/shrink_rate/max_conceal: must not be negative")
        if self.window < 1 or self.capacity < 1:
            raise ValueError("window/capacity: must be at least 1")
        if self.resync_threshold <= self.max_delay:
            raise ValueError(f"resync_threshold: {self.resync_threshold!r} s must exceed max_delay")


@dataclass(frozen=True)
class PlayoutFrame(Generic[PayloadT]):
    """One frame slot leaving the buffer, in playout order.

    Attributes:
        pts: presentation timestamp in RTP clock units, continuous from 0.
        payload: the packet's payload, or ``None`` for a concealment slot.
        sequence_number: the packet's 16-bit sequence number (``None``: concealment).
        due: the local time the slot was scheduled for.
    """

    pts: int
    payload: PayloadT | None
    sequence_number: int | None
    due: float

    @property
    def concealed(self) -> bool:
        """Whether this slot stands for a missing packet."""
        return self.payload is None


@dataclass
class JitterBufferStats:
    """Counters of an :class:`AdaptiveJitterBuffer` (no payload bytes).

    Attributes:
        received: packets given to :meth:`AdaptiveJitterBuffer.receive_packet`.
        played: frames released with their packet.
        concealed: concealment slots released.
        late: packets dropped because their slot had passed.
        duplicates: packets dropped as already held or played.
        skipped: frames of timeline skipped without concealment (pauses).
        overflow: packets dropped because the buffer was full.
        resyncs: schedules restarted after a timestamp jump.
        delay: current buffering beyond the fastest recent packet, in seconds.
        max_delay_seen: the largest such buffering so far, in seconds.
        jitter: RFC 3550 §6.4.1 interarrival jitter, in seconds.
    """

    received: int = 0
    played: int = 0
    concealed: int = 0
    late: int = 0
    duplicates: int = 0
    skipped: int = 0
    overflow: int = 0
    resyncs: int = 0
    delay: float = 0.0
    max_delay_seen: float = 0.0
    jitter: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass(order=True)
class _Held(Generic[PayloadT]):
    ts: int  # timestamp relative to the schedule's origin (unwrapped)
    seq: int = field(compare=False)  # unwrapped sequence number
    wire_seq: int = field(compare=False)
    payload: PayloadT = field(compare=False)


class _Unwrapper:
    """RFC 3550 Appendix A.1 style extension of an ``n``-bit counter."""

    def __init__(self, bits: int) -> None:
        self.modulus = 1 << bits
        self.highest: int | None = None

    def unwrap(self, value: int) -> int:
        if self.highest is None:
            self.highest = value
            return value
        delta = (value - self.highest) % self.modulus
        if delta >= self.modulus // 2:
            delta -= self.modulus
        extended = self.highest + delta
        self.highest = max(self.highest, extended)
        return extended


class AdaptiveJitterBuffer(Generic[PayloadT]):
    """Sans-I/O adaptive playout buffer for one audio RTP stream (module docstring).

    * Inputs: :meth:`receive_packet` (``now`` is the arrival time) and
      :meth:`handle_timer`.
    * Outputs: :meth:`frames_to_play` (frames and concealment slots, in order)
      and :meth:`get_timer` (when to call :meth:`handle_timer` next).

    Times are seconds on any monotonic clock, the same for every call.

    Args:
        config: tuning (defaults suit 20 ms Opus).
    """

    def __init__(self, config: JitterBufferConfig | None = None) -> None:
        self.config = config or JitterBufferConfig()
        self.stats = JitterBufferStats()
        self._output: list[PlayoutFrame[PayloadT]] = []
        #: How long after its slot the last packet arrived (negative: early), in seconds.
        self.last_lateness = 0.0
        self._pts_offset = 0  # output pts of the current schedule's origin
        self._max_conceal = max(1, round(self.config.max_conceal * self.config.clock_rate))
        self._reset_schedule()

    def _reset_schedule(self) -> None:
        self._seq = _Unwrapper(16)
        self._ts = _Unwrapper(32)
        self._origin: int | None = None  # unwrapped timestamp of the schedule's origin
        self._heap: list[_Held[PayloadT]] = []
        self._held: set[int] = set()  # unwrapped sequence numbers in the heap
        self._played: collections.deque[int] = collections.deque(maxlen=128)
        self._cursor: int | None = None  # timestamp of the next slot to fill
        self._last_seq: int | None = None  # highest unwrapped seq with its timestamp
        self._last_seq_ts = 0
        self._frame_ts = round(self.config.frame_duration * self.config.clock_rate)
        self._size_seen = 0
        self._conceal_run = 0  # concealment released in a row, in timestamp units
        self._paused = False
        self._window: collections.deque[float] = collections.deque()
        self._sorted: list[float] = []
        self._target = 0.0  # the playout offset the window asks for (_note_delay)
        self._offset: float | None = None  # the playout offset P (seconds)
        self._offset_time = 0.0
        self._transit: float | None = None  # for the RFC 3550 jitter

    # --- inputs ------------------------------------------------------------------------

    def receive_packet(
        self,
        sequence_number: int,
        timestamp: int,
        payload: PayloadT,
        now: float,
        *,
        measure: bool = True,
    ) -> None:
        """Take one RTP packet (RFC 3550 §5.1 header fields) that arrived at ``now``.

        Args:
            sequence_number: the 16-bit sequence number.
            timestamp: the 32-bit RTP timestamp.
            payload: what to hand back in its :class:`PlayoutFrame` (opaque).
            now: arrival time.
            measure: add its delay to the statistics; ``False`` when ``now`` is
                known to be late for local reasons (the shell's event loop was
                blocked), which says nothing about the network.

        Raises:
            ValueError: a field is out of range (the message names it).

        After calling this method: call :meth:`frames_to_play` and :meth:`get_timer`.
        """
        if not 0 <= sequence_number <= 0xFFFF:
            raise ValueError(f"sequence_number: {sequence_number!r} is not a 16-bit value")
        if not 0 <= timestamp <= 0xFFFFFFFF:
            raise ValueError(f"timestamp: {timestamp!r} is not a 32-bit value")
        self.stats.received += 1
        if self._origin is None:
            self._start(sequence_number, timestamp, now)
        seq = self._seq.unwrap(sequence_number)
        ts = self._ts.unwrap(timestamp) - self._require_origin()
        if self._needs_resync(seq, ts, now):
            self._resync()
            self._start(sequence_number, timestamp, now)
            seq = self._seq.unwrap(sequence_number)
            ts = self._ts.unwrap(timestamp) - self._require_origin()
        if measure or not self._sorted:
            self._note_delay(ts, now)
        self._note_frame_size(seq, ts)
        if seq in self._held or seq in self._played:
            self.stats.duplicates += 1
        elif self._cursor is not None and ts < self._cursor:
            self.stats.late += 1  # its slot was concealed or skipped
        elif len(self._heap) >= self.config.capacity:
            self.stats.overflow += 1
        else:
            heapq.heappush(self._heap, _Held(ts, seq, sequence_number, payload))
            self._held.add(seq)
            if self._paused:  # a pause (DTX, hold) ends: carry on from this packet
                self._resume(ts)
        self._release(now)

    def handle_timer(self, now: float) -> None:
        """Release what is due at ``now``.

        After calling this method: call :meth:`frames_to_play` and :meth:`get_timer`.
        """
        self._release(now)

    # --- outputs -----------------------------------------------------------------------

    def frames_to_play(self) -> list[PlayoutFrame[PayloadT]]:
        """Return the frames released since the last call, in playout order."""
        frames, self._output = self._output, []
        return frames

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` should next be called (``None``: no need)."""
        if self._offset is None or self._cursor is None or self._paused:
            return None
        if not self._heap and self._conceal_run >= self._max_conceal:
            return None
        slot = self._cursor
        if self._heap and self._heap[0].ts < slot:
            slot = self._heap[0].ts
        return slot / self.config.clock_rate + self._offset

    @property
    def buffered(self) -> int:
        """Packets held."""
        return len(self._heap)

    @property
    def frame_length(self) -> int:
        """The frame length in RTP clock units (learnt from the packets)."""
        return self._frame_ts

    @property
    def delay(self) -> float:
        """Current buffering beyond the fastest recent packet, in seconds."""
        return self.stats.delay

    # --- internals ---------------------------------------------------------------------

    def _require_origin(self) -> int:
        assert self._origin is not None
        return self._origin

    def _start(self, sequence_number: int, timestamp: int, now: float) -> None:
        self._seq.unwrap(sequence_number)
        self._origin = self._ts.unwrap(timestamp)
        self._cursor = 0
        self._offset = now + self.config.initial_delay
        self._offset_time = now

    def _needs_resync(self, seq: int, ts: int, now: float) -> bool:
        assert self._offset is not None
        if self._last_seq is not None and seq < self._last_seq - _MAX_MISORDER:
            return True  # sequence numbers restarted (RFC 3550 A.1, MAX_MISORDER)
        self.last_lateness = now - (ts / self.config.clock_rate + self._offset)
        return abs(self.last_lateness) > self.config.resync_threshold

    def _resync(self) -> None:
        """Flush what is held (in order, at once) and forget the schedule."""
        self.stats.resyncs += 1
        end = self._cursor or 0
        while self._heap:
            held = heapq.heappop(self._heap)
            self._emit(held.ts, held.payload, held.wire_seq, math.nan)
            end = held.ts + self._frame_ts
        self._pts_offset += max(end, self._cursor or 0)
        self._reset_schedule()

    def _resume(self, ts: int) -> None:
        assert self._cursor is not None
        self._paused = False
        self._conceal_run = 0
        if ts > self._cursor:
            self.stats.skipped += (ts - self._cursor) // self._frame_ts
            self._cursor = ts

    def _note_frame_size(self, seq: int, ts: int) -> None:
        """Learn the frame length from consecutive packets (twice the same, ≤ 120 ms)."""
        if self._last_seq is not None and seq == self._last_seq + 1:
            size = ts - self._last_seq_ts
            if 0 < size <= round(0.120 * self.config.clock_rate):
                if size == self._size_seen:
                    self._frame_ts = size
                self._size_seen = size
        if self._last_seq is None or seq > self._last_seq:
            self._last_seq = seq
            self._last_seq_ts = ts

    def _note_delay(self, ts: int, now: float) -> None:
        """Add a relative delay sample; update ``P`` and the RFC 3550 jitter."""
        relative = now - ts / self.config.clock_rate
        # RFC 3550 §6.4.1: J += (|D(i-1,i)| - J) / 16, on arrival order.
        if self._transit is not None:
            d = abs(relative - self._transit)
            if d < self.config.resync_threshold:
                self.stats.jitter += (d - self.stats.jitter) / 16
        self._transit = relative
        self._window.append(relative)
        ordered = self._sorted
        bisect.insort(ordered, relative)
        if len(self._window) > self.config.window:
            del ordered[bisect.bisect_left(ordered, self._window.popleft())]
        # The target changes only with the window: computed here, once a packet,
        # not at every release (the sorted window gives min and quantile at once).
        cfg = self.config
        count = len(ordered)
        fastest = ordered[0]
        wanted = ordered[max(0, min(count - 1, math.ceil(cfg.quantile * count) - 1))] + cfg.margin
        self._target = min(max(wanted, fastest + cfg.min_delay), fastest + cfg.max_delay)
        self._update_offset(now)

    def _update_offset(self, now: float) -> None:
        if self._offset is None or not self._sorted:
            return
        target = self._target
        if target >= self._offset:
            self._offset = target  # grow at once: the audio pauses for the difference
        else:
            elapsed = max(0.0, now - self._offset_time)
            self._offset = max(target, self._offset - self.config.shrink_rate * elapsed)
        self._offset_time = now
        self.stats.delay = self._offset - self._sorted[0]
        self.stats.max_delay_seen = max(self.stats.max_delay_seen, self.stats.delay)

    def _emit(self, ts: int, payload: PayloadT | None, wire_seq: int | None, due: float) -> None:
        self._output.append(PlayoutFrame(ts + self._pts_offset, payload, wire_seq, due))

    def _release(self, now: float) -> None:
        if self._offset is None or self._cursor is None:
            return
        if now != self._offset_time:  # else _note_delay just did it
            self._update_offset(now)
        rate = self.config.clock_rate
        while not self._paused:
            head = self._heap[0] if self._heap else None
            if head is not None and head.ts <= self._cursor:
                due = head.ts / rate + self._offset
                if now < due:
                    return
                heapq.heappop(self._heap)
                self._held.discard(head.seq)
                self._played.append(head.seq)
                self._emit(head.ts, head.payload, head.wire_seq, due)
                self.stats.played += 1
                self._cursor = max(self._cursor, head.ts + self._frame_ts)
                self._conceal_run = 0
                continue
            # The slot at the cursor has no packet (yet).
            due = self._cursor / rate + self._offset
            if now < due:
                return
            if self._conceal_run < self._max_conceal:
                self._emit(self._cursor, None, None, due)
                self.stats.concealed += 1
                self._cursor += self._frame_ts
                self._conceal_run += self._frame_ts
            elif head is not None:  # a long outage: jump to the next packet held
                self.stats.skipped += (head.ts - self._cursor) // self._frame_ts
                self._cursor = head.ts
            else:
                self._paused = True  # nothing to play: wait for a packet


# --- the aiortc glue --------------------------------------------------------------------

#: The payload the glue stores: aiortc's codec parameters and the depayloaded bytes.
_Payload = tuple[Any, bytes]


def conceal_payload(codec: Any, last: bytes, samples: int) -> bytes | None:
    """Return bytes aiortc's decoder turns into ``samples`` of concealment, or ``None``.

    * Opus: the last packet's TOC byte with frame-count code 0 and no frame
      data, which RFC 6716 §3.2.1 (a frame of length 0) and libopus treat as a
      lost frame: the decoder runs its packet-loss concealment for the
      configuration's frame size.
    * PCMU / PCMA (G.711): digital silence of the frame's length.

    Args:
        codec: the ``RTCRtpCodecParameters`` of the stream.
        last: the last payload played (for its Opus TOC byte).
        samples: the slot's length in RTP clock units.
    """
    mime = str(getattr(codec, "mimeType", "")).lower()
    if mime == "audio/opus":
        return bytes([last[0] & 0xFC]) if last else None
    if mime == "audio/pcmu":
        return b"\xff" * samples
    if mime == "audio/pcma":
        return b"\xd5" * samples
    return None


class ReceiverJitterBuffer:
    """What one aiortc ``RTCRtpReceiver`` sees as its jitter buffer.

    aiortc calls :meth:`add` for each depayloaded packet and would decode the
    frame returned; this returns none and instead feeds the
    :class:`AdaptiveJitterBuffer`, puts the frames it releases on the
    receiver's decoder queue, and keeps an event-loop timer for the next one.

    Args:
        receiver: the audio receiver (its private fields, checked by
            :func:`install_jitter_buffer`).
        config: tuning of the core.
        clock: the clock (default: the event loop's).
    """

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        config: JitterBufferConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.receiver = receiver
        self.core: AdaptiveJitterBuffer[_Payload] = AdaptiveJitterBuffer(config)
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = asyncio.get_event_loop()
        self._clock = clock or self._loop.time
        # aiortc creates these with the receiver and never replaces them.
        self._codecs: dict[int, Any] = getattr(receiver, "_RTCRtpReceiver__codecs")
        self._decoder_queue: Any = getattr(receiver, "_RTCRtpReceiver__decoder_queue")
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._last: _Payload | None = None
        self._catch_up_until = -math.inf
        #: Times the event loop was found blocked (a timer ran late by more than
        #: :data:`STALL_THRESHOLD`).
        self.stalls = 0

    @property
    def stats(self) -> JitterBufferStats:
        return self.core.stats

    def add(self, packet: Any) -> tuple[bool, None]:
        """aiortc's ``JitterBuffer.add``: take a packet, never return a frame itself."""
        codec = self._codecs.get(packet.payload_type)
        data = getattr(packet, "_data", b"")
        if codec is not None:
            now = self._clock()
            self.core.receive_packet(
                packet.sequence_number,
                packet.timestamp,
                (codec, data),
                now,
                measure=now >= self._catch_up_until,
            )
            if self.core.last_lateness <= 0:
                self._catch_up_until = -math.inf  # on time again: the backlog is through
            self._service()
        return False, None

    def close(self) -> None:
        """Stop the timer (the receiver stopped)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _on_timer(self) -> None:
        now = self._clock()
        late = self._timer_at is not None and now - self._timer_at > STALL_THRESHOLD
        self._timer = self._timer_at = None
        if late:
            # The event loop was blocked (this process was busy or descheduled):
            # packets that reached the socket meanwhile are still queued behind
            # this callback. Let them in before concealing their slots, and keep
            # their delays, inflated by the stall, out of the statistics.
            self._catch_up_until = now + STALL_CATCH_UP
            self._timer_at = now + STALL_DEFER
            self._timer = self._loop.call_at(self._timer_at, self._on_timer)
            self.stalls += 1
            return
        self.core.handle_timer(now)
        self._service()

    def _service(self) -> None:
        decoder = getattr(self.receiver, "_RTCRtpReceiver__decoder_thread")
        frames = self.core.frames_to_play()
        if decoder is None:  # the receiver stopped: nothing decodes any more
            self.close()
            return
        queue = self._decoder_queue
        for frame in frames:
            if frame.payload is not None:
                self._last = frame.payload
                codec, data = frame.payload
            elif self._last is not None:
                codec, last = self._last
                concealment = conceal_payload(codec, last, self.core.frame_length)
                if concealment is None:
                    continue
                data = concealment
            else:
                continue
            queue.put((codec, JitterFrame(data=data, timestamp=frame.pts)))
        when = self.core.get_timer()
        if when != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None if when is None else self._loop.call_at(when, self._on_timer)
            self._timer_at = when


def check_aiortc_version(version: str | None = None) -> None:
    """Refuse aiortc versions whose receiver internals were not checked.

    Raises:
        CallError: the version is outside :data:`AIORTC_SUPPORTED`.
    """
    require_aiortc(AIORTC_SUPPORTED, "jitter buffer", "use jitter_buffer='stock'", version)


def get_jitter_buffer(receiver: RTCRtpReceiver) -> ReceiverJitterBuffer | None:
    """Return the adaptive buffer installed on ``receiver``, if any."""
    found = getattr(receiver, _ATTRIBUTE, None)
    return found if isinstance(found, ReceiverJitterBuffer) else None


def _install_on_receiver(
    receiver: RTCRtpReceiver, config: JitterBufferConfig | None
) -> ReceiverJitterBuffer:
    existing = get_jitter_buffer(receiver)
    if existing is not None:
        return existing
    for name in _RECEIVER_FIELDS:
        if not hasattr(receiver, "_RTCRtpReceiver" + name):
            raise CallError(f"aiortc's RTCRtpReceiver lacks {name}: unsupported version")
    if getattr(receiver, "_RTCRtpReceiver__kind", None) != "audio":
        raise CallError("receiver: the adaptive jitter buffer is for audio receivers")
    buffer = ReceiverJitterBuffer(receiver, config)
    setattr(receiver, "_RTCRtpReceiver__jitter_buffer", buffer)
    setattr(receiver, _ATTRIBUTE, buffer)
    return buffer


def install_jitter_buffer(
    target: RTCPeerConnection | RTCRtpReceiver, config: JitterBufferConfig | None = None
) -> list[ReceiverJitterBuffer]:
    """Give audio receivers the adaptive jitter buffer instead of aiortc's fixed one.

    On a peer connection: every audio receiver it has now, and (through its
    ``track`` event) every one it gets from a remote description later. Call it
    before media flows, for example right after ``addTrack``. Installing twice
    is harmless. Stock receivers elsewhere in the process are untouched.

    Args:
        target: an ``RTCPeerConnection`` or one audio ``RTCRtpReceiver``.
        config: tuning of the buffers (default :class:`JitterBufferConfig`).

    Returns:
        The buffers installed so far (see also :func:`get_jitter_buffer`).

    Raises:
        CallError: unsupported aiortc version, or a receiver that is not audio.
    """
    check_aiortc_version()
    if isinstance(target, RTCRtpReceiver):
        return [_install_on_receiver(target, config)]
    if not isinstance(target, RTCPeerConnection):
        raise CallError(f"target: expected RTCPeerConnection or RTCRtpReceiver, not {target!r}")
    pc = target

    def audio_receivers() -> list[RTCRtpReceiver]:
        return [t.receiver for t in pc.getTransceivers() if t.kind == "audio"]

    installed = [_install_on_receiver(r, config) for r in audio_receivers()]
    if not getattr(pc, _ATTRIBUTE, False):
        setattr(pc, _ATTRIBUTE, True)

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                for receiver in audio_receivers():
                    _install_on_receiver(receiver, config)

    return installed


def apply_jitter_buffer_mode(pc: RTCPeerConnection, mode: str) -> list[ReceiverJitterBuffer]:
    """Apply ``CallOptions.jitter_buffer`` to a peer connection.

    Args:
        pc: the call's peer connection, after its audio transceiver exists.
        mode: ``adaptive`` (:func:`install_jitter_buffer`) or ``stock`` (aiortc's
            fixed 4-frame prefetch, kept for the harness's comparisons).

    Returns:
        The buffers installed (none for ``stock``).

    Raises:
        CallError: an unknown mode (the message lists the known ones), or an
            aiortc the adaptive buffer was not checked on.
    """
    if mode not in JITTER_BUFFER_MODES:
        raise CallError(
            f"jitter_buffer: unknown mode {mode!r} (known: {', '.join(JITTER_BUFFER_MODES)})"
        )
    return install_jitter_buffer(pc) if mode == "adaptive" else []
