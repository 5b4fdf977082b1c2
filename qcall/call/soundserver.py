"""A private PulseAudio server with virtual devices, for tests and benchmarks (no sound card).

:class:`VirtualSoundServer` starts Debian's ``pulseaudio`` as a user-space
daemon whose runtime, state and socket live in a temporary folder, loads no
hardware modules, and builds this device graph out of one stereo null sink::

    mouth (sink, mono) ──► bench front-left  ──► mic (source, mono)   the "microphone"
    spk   (sink, mono) ──► bench front-right                          the "speaker"
    bench.monitor (stereo): left = what the microphone hears, right = what the
                            speaker plays, on one sample clock

Whatever is played into ``mouth`` is what a call captures from ``mic``; what a
call plays on ``spk`` appears on the right channel of ``bench.monitor``, sample
aligned with the left. Recording ``bench.monitor`` therefore measures
mouth-to-ear delay to the sample (``scripts/bench_audio_latency.py``).

Running as root (CI) works without ``--system``: the daemon only warns. The
clients find it through ``PULSE_SERVER`` (:attr:`VirtualSoundServer.env`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from qcall.exceptions import MediaError

__all__ = ["MIC", "MONITOR", "MOUTH", "SPEAKER", "VirtualSoundServer"]

logger = logging.getLogger(__name__)

MOUTH, MIC, SPEAKER, MONITOR = "mouth", "mic", "spk", "bench.monitor"

_SCRIPT = """\
load-module module-native-protocol-unix auth-anonymous=1 socket={socket}
load-module module-null-sink sink_name=bench channels=2 rate=48000 \
sink_properties=device.description=qcall-bench
load-module module-remap-sink sink_name=mouth master=bench channels=1 \
master_channel_map=front-left channel_map=mono remix=no \
sink_properties=device.description=qcall-virtual-mouth
load-module module-remap-sink sink_name=spk master=bench channels=1 \
master_channel_map=front-right channel_map=mono remix=no \
sink_properties=device.description=qcall-virtual-speaker
load-module module-remap-source source_name=mic master=bench.monitor channels=1 \
master_channel_map=front-left channel_map=mono remix=no \
source_properties=device.description=qcall-virtual-microphone
set-default-sink spk
set-default-source mic
"""


class VirtualSoundServer:
    """``pulseaudio`` in a temporary folder with the virtual devices above.

    Args:
        folder: where its socket, state and log go (a new temporary folder if
            ``None``, removed on :meth:`stop`).

    Raises:
        MediaError: ``pulseaudio`` is not installed or did not come up (the
            message quotes its log).
    """

    def __init__(self, folder: Path | None = None) -> None:
        self._own = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="qcall-pulse-")) if folder is None else folder
        self.socket = self.folder / "native"
        self.log = self.folder / "pulseaudio.log"
        self.env = {"PULSE_SERVER": f"unix:{self.socket}"}
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("pulseaudio")
        if binary is None:
            raise MediaError("pulseaudio is not installed: apt-get install pulseaudio")
        self.folder.mkdir(parents=True, exist_ok=True)
        script = self.folder / "default.pa"
        script.write_text(_SCRIPT.format(socket=self.socket), encoding="utf-8")
        env = dict(os.environ)
        for name in ("HOME", "XDG_RUNTIME_DIR", "PULSE_RUNTIME_PATH", "PULSE_STATE_PATH"):
            env[name] = str(self.folder)
        env.pop("PULSE_SERVER", None)
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    binary, "-n", "-F", str(script), "--daemonize=no", "--exit-idle-time=-1",
                    "--use-pid-file=no", "--log-target=stderr", "--log-level=warning",
                ],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise MediaError(f"pulseaudio did not start ({self.log}): {text}")
            time.sleep(0.05)
        logger.debug("< virtual sound server up at %s", self.socket)

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        probe = subprocess.run(
            ["pactl", "--server", f"unix:{self.socket}", "info"],
            capture_output=True, timeout=5, check=False,
        ) if shutil.which("pactl") else None  # fmt: skip
        return probe is None or probe.returncode == 0

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and remove a folder it created."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._own:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> VirtualSoundServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
