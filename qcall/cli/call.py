"""``qcall call USER`` and ``qcall listen``: place and answer encrypted calls.

Settings come from flags, else from a TOML config file (``--config``, default
``HOME/config.toml``), else from defaults: :mod:`qcall.cli.settings` reads them
(an example there and in docs/calls.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from qcall.cli.settings import (
    DEFAULT_SIGNALING,
    ice_servers_config,
    key_source_config,
    load_config,
    pick,
    signaling_tls,
)
from qcall.exceptions import ConfigError, MediaError, QCallError

__all__ = ["register"]

logger = logging.getLogger(__name__)



def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qcall.call.media_args import add_media_arguments

    call = sub.add_parser(
        "call",
        help="call a user",
        description="Call USER through the signaling server, with hybrid QKD + ML-KEM keys.",
    )
    call.add_argument("user", help="who to call (their registered name)")
    _common(call)
    add_media_arguments(call)
    call.add_argument("--chirp-every", type=float, metavar="S", help=argparse.SUPPRESS)
    call.set_defaults(func=run_call)

    listen = sub.add_parser(
        "listen",
        help="wait for calls",
        description="Register and wait for incoming calls.",
    )
    _common(listen)
    add_media_arguments(listen)
    listen.add_argument("--auto-answer", action="store_true", help="pick up every call")
    listen.add_argument("--once", action="store_true", help="exit after the first call")
    listen.set_defaults(func=run_listen)


def _common(p: argparse.ArgumentParser) -> None:
    g = add_connection_arguments(p)
    g.add_argument(
        "--ice-server",
        action="append",
        metavar="URL",
        help="STUN/TURN server for NAT, e.g. stun:stun.example.org:3478 (repeatable; "
        "TURN credentials: [[ice_servers]] in the config)",
    )
    g.add_argument(
        "--ice-policy",
        choices=["all", "relay"],
        help="ICE candidates to use: all (default), or relay: media only through a TURN "
        "server (from the signaling server or [[ice_servers]]), never to the peer directly",
    )
    s = p.add_argument_group("security")
    s.add_argument("--policy", choices=["hybrid", "pqc"], help="security policy (hybrid)")
    s.add_argument(
        "--otp",
        choices=["end", "hybrid"],
        help="one-time-pad media (docs/otp.md); when the key pool runs low: end the call "
        "or fall back to hybrid (both phones must give --otp)",
    )
    s.add_argument(
        "--allow-pqc-only",
        action="store_true",
        default=None,
        help="accept ML-KEM-only calls when QKD is unavailable (shown on screen)",
    )
    s.add_argument("--rekey-interval", type=float, metavar="S", help="seconds between rekeys (30)")
    s.add_argument(
        "--fresh-kem",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a fresh ML-KEM exchange in every rekey (default: on; --no-fresh-kem: hash ratchet)",
    )
    s.add_argument(
        "--srtp-profile",
        choices=["AEAD_AES_256_GCM", "AES128_CM_HMAC_SHA1_80"],
        help="preferred SRTP profile (AEAD_AES_256_GCM)",
    )
    s.add_argument("--strict-contacts", action="store_true", help="refuse unknown peers")
    o = p.add_argument_group("output")
    o.add_argument("--seconds", type=float, metavar="N", help="hang up after N seconds")
    o.add_argument("--json", action="store_true", help="print the call report as JSON")
    o.add_argument("--report", metavar="FILE", help="write the call report (JSON) to FILE")
    o.add_argument(
        "--quiet", action="store_true", help="no live status (the SAS is still shown)"
    )
    o.add_argument(
        "--no-speaker",
        action="store_true",
        help="discard the audio received (no speaker, no warning about its absence)",
    )


def add_connection_arguments(p: argparse.ArgumentParser) -> Any:
    """``--config``, ``--signaling`` and the key source flags (also ``qcall send`` &c.)."""
    g = p.add_argument_group("connection and keys")
    g.add_argument("--config", metavar="FILE", help="TOML config (default: HOME/config.toml)")
    g.add_argument("--signaling", metavar="URL", help=f"signaling server ({DEFAULT_SIGNALING})")
    g.add_argument(
        "--signaling-ca",
        metavar="FILE",
        help="CA certificate that signed a wss:// server's certificate (default: system CAs)",
    )
    g.add_argument("--kme", metavar="URL", help="ETSI GS QKD 014 KME of this user's site")
    g.add_argument("--cert", metavar="FILE", help="SAE client certificate for the KME")
    g.add_argument("--key", metavar="FILE", help="its private key")
    g.add_argument("--ca", metavar="FILE", help="CA that signed the KME's certificate")
    g.add_argument("--key-source", metavar="URL", help="other key source, e.g. keyfile:PATH")
    g.add_argument(
        "--network", metavar="FILE", help="network.json of `qcall network`: take our SAE's KME"
    )
    g.add_argument("--sae", metavar="ID", help="this user's SAE ID (default: the user name)")
    return g


def build_phone(
    args: argparse.Namespace, *, chirp_at: list[float] | None = None
) -> tuple[Any, Any]:
    """Create the :class:`~qcall.call.phone.Phone` the flags describe.

    Returns:
        The phone, and the audio source its first call will send (opened now, so
        that a bad file or device fails before dialling; ``None``: no audio).
    """
    from qcall.call.media import open_source
    from qcall.call.phone import Phone
    from qcall.call.session import CallOptions
    from qcall.config import qcall_home
    from qcall.contacts import ContactStore
    from qcall.handshake import SRTPProfile
    from qcall.identity import PREVIOUS_IDENTITY_DIR, Identity
    from qcall.qkd.client import open_key_source

    home = qcall_home(args.home)
    conf = load_config(args.config, home)
    identity = Identity.load(home)
    previous = home / PREVIOUS_IDENTITY_DIR  # kept by `identity new --force`
    previous_key = Identity.load(previous).signing_key if Identity.exists(previous) else None
    contacts = ContactStore.in_home(home, strict=args.strict_contacts)
    sae = pick(args, conf, "sae", "sae_id", identity.name)
    options = CallOptions(
        policy=pick(args, conf, "policy", "policy", "hybrid"),
        allow_pqc_only=bool(pick(args, conf, "allow_pqc_only", "allow_pqc_only", False)),
        rekey_interval=float(pick(args, conf, "rekey_interval", "rekey_interval", 30.0)),
        fresh_kem_on_rekey=bool(pick(args, conf, "fresh_kem", "fresh_kem", True)),
        srtp_profile=SRTPProfile(
            pick(args, conf, "srtp_profile", "srtp_profile", "AEAD_AES_256_GCM")
        ),
        sae_id=sae,
        ice_servers=ice_servers_config(args, conf),
        ice_policy=pick(args, conf, "ice_policy", "ice_policy", "all"),
    )
    if getattr(args, "otp", None):
        from qcall.otp.keystream import OTPPolicy

        options.otp = OTPPolicy(on_exhausted=args.otp)
    if options.policy not in ("hybrid", "pqc"):
        raise ConfigError(f"policy must be hybrid or pqc, not {options.policy!r}")
    if options.ice_policy not in ("all", "relay"):
        raise ConfigError(f"ice_policy must be all or relay, not {options.ice_policy!r}")
    if options.rekey_interval is not None and options.rekey_interval <= 0:
        raise ConfigError("rekey interval must be positive")
    ks_conf = key_source_config(args, conf, sae)
    key_source = open_key_source(ks_conf) if ks_conf else None
    if key_source is None and options.policy == "hybrid" and not options.allow_pqc_only:
        raise ConfigError(
            "no QKD key source: give --kme/--cert/--key/--ca, --key-source, --network or "
            "[key_source] in the config; or choose --policy pqc / --allow-pqc-only"
        )
    # Open the audio source once now, so a bad file or device fails before dialling.
    explicit = args.tone is not None or args.input or args.input_device is not None

    def open_any() -> Any:
        try:
            return open_source(args, chirp_at=chirp_at)
        except MediaError as exc:
            if explicit:
                raise
            _warn_once("microphone", "no microphone (%s); sending no audio", exc)
            return None

    first_source: list[Any] = [open_any()]

    def make_source() -> Any:
        return first_source.pop() if first_source else open_any()

    # Presence of the contacts only (the server then sends O(contacts), not O(users));
    # with no contacts yet, everyone's.
    watch = [contact.name for contact in contacts.list()][:1000] or None
    url = pick(args, conf, "signaling", "signaling", DEFAULT_SIGNALING)
    tls = signaling_tls(url, pick(args, conf, "signaling_ca", "signaling_ca", None))
    from qcall.qkd.reservoir import ReservoirConfig

    prefetch = ReservoirConfig(  # docs/qkd-keys.md; ConfigError if out of range
        keys_per_peer=int(conf.get("qkd_prefetch", 2)),
        max_age=float(conf.get("qkd_prefetch_max_age", 120.0)),
    )
    phone = Phone(
        url,
        identity.signing_key,
        identity.name,
        check_peer=contacts.check_peer,
        peer_trust=contacts.peer_trust,
        key_source=key_source,
        options=options,
        make_source=make_source,
        watch=watch,
        ssl=tls,
        previous_key=previous_key,
        prefetch=prefetch,
    )
    return phone, (first_source[0] if first_source else None)


# --- running a call ------------------------------------------------------------------------


class _Console:
    """Live status (rich) or plain lines when not a terminal / ``--quiet``."""

    def __init__(self, quiet: bool, json_out: bool) -> None:
        self.quiet = quiet or json_out
        self.live: Any = None
        #: Ctrl-C / SIGTERM arrived during the last call.
        self.interrupted = False

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def always(self, text: str) -> None:
        """Print even with ``--quiet``/``--json`` (the SAS: users must be able to compare it)."""
        print(text, file=sys.stderr, flush=True)

    def start(self, session: Any) -> None:
        if self.quiet or not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.live import Live

        self.live = Live(
            _status_table(session), console=Console(stderr=True), refresh_per_second=4
        )
        self.live.start()

    def update(self, session: Any) -> None:
        if self.live is not None:
            self.live.update(_status_table(session))

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _status_table(session: Any) -> Any:
    from rich.table import Table

    st = session.status
    direction = "call to" if st.role == "caller" else "call from"
    table = Table(title=f"qcall — {direction} {st.peer}", show_header=False, box=None)
    table.add_row("state", st.state.name)
    policy = st.policy + (f"  [yellow]{st.notice}[/]" if st.notice else "")
    table.add_row("policy", policy)
    table.add_row("suite", f"{st.kem}, {st.signature}, {st.srtp_profile}")
    table.add_row("identity", _identity(st))
    table.add_row("SAS", f"[bold]{st.sas}[/]  (compare by voice; `qcall contacts verify`)")
    table.add_row("key_IDs", ", ".join(st.qkd_key_ids) or "—")
    table.add_row("rekeys", f"{st.rekeys} (epoch {st.epoch}, failures {st.rekey_failures})")

    def fmt(v: Any, unit: str) -> str:
        return "—" if v is None else f"{v} {unit}"

    table.add_row(
        "RTCP",
        f"RTT {fmt(st.rtt_ms, 'ms')}, jitter {fmt(st.jitter_ms, 'ms')}, "
        f"lost {fmt(st.packets_lost, 'packets')}",
    )
    table.add_row("media path", st.ice.describe() if st.ice is not None else "—")
    if st.otp_budget:
        table.add_row("one-time pad", st.otp_budget)
    if st.playout_delay_ms is not None:
        table.add_row(
            "playout",
            f"jitter buffer {fmt(st.playout_delay_ms, 'ms')}, concealed "
            f"{fmt(st.frames_concealed, 'frames')}, late {fmt(st.packets_late, 'packets')}",
        )
    if st.mic_dropped_blocks is not None or st.speaker_underruns is not None:
        table.add_row(
            "devices",
            f"microphone dropped {fmt(st.mic_dropped_blocks, 'blocks')}, "
            f"speaker underruns {fmt(st.speaker_underruns, '')}".rstrip(),
        )
    return table


def _identity(st: Any) -> str:
    """The peer's fingerprint and how it was trusted (organisation, SAS, or unverified)."""
    from qcall.contacts import describe_trust

    trust = describe_trust(st.peer_trust)
    if st.peer_trust == "unverified":
        trust = "UNVERIFIED: compare the SAS by voice"
    return f"{st.peer_fingerprint or '—'} ({trust})"


def _summary(session: Any) -> str:
    st = session.status
    return (
        f"connected to {st.peer}, identity {_identity(st)}:\n  policy {st.policy}, "
        f"{st.kem} + {st.signature}, "
        f"{st.srtp_profile}, SAS {st.sas}, QKD key_IDs {', '.join(st.qkd_key_ids) or '—'}"
        + (f"\n  media path: {st.ice.describe()}" if st.ice is not None else "")
        + (f"\n  NOTE: {st.notice}" if st.notice else "")
    )


#: How a call ended when Ctrl-C or SIGTERM hung it up.
SIGNAL_HANGUP = "local hangup (signal)"


def _stopped(what: str) -> None:
    """Say what Ctrl-C / SIGTERM stopped (also with --quiet: the user asked for it)."""
    print(f"qcall: interrupted: {what}", file=sys.stderr, flush=True)


async def _supervise(session: Any, seconds: float | None, console: _Console) -> str:
    """Run until hangup, the time limit, Ctrl-C or SIGTERM; return how it ended."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    deadline = None if seconds is None else time.monotonic() + seconds
    console.start(session)
    how = "remote hangup"
    try:
        while not session.ended.done():
            if stop.is_set():
                how = SIGNAL_HANGUP
                break
            if deadline is not None and time.monotonic() >= deadline:
                how = "local hangup (time limit)"
                break
            await session.refresh_stats()
            console.update(session)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        console.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    # A signal as the call ended (the peer hung up first) is not lost: it stops `listen`.
    console.interrupted = stop.is_set()
    await session.refresh_stats()
    if not session.ended.done():
        await session.hangup()
    return how


def _report(session: Any, how: str, extra: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = session.status.as_dict()
    report["ended"] = how
    report.update(extra)
    return report


def _emit(args: argparse.Namespace, report: dict[str, Any]) -> None:
    text = json.dumps(report, indent=2, default=str)
    if args.report:
        Path(args.report).write_text(text + "\n", encoding="utf-8")
    if args.json:
        print(text)


async def _call(args: argparse.Namespace) -> int:
    from qcall.call.media import open_sink

    chirp_at = None
    if args.chirp_every:
        limit = args.seconds or 60.0
        chirp_at = [0.5 + i * args.chirp_every for i in range(int(limit / args.chirp_every) + 1)]
    phone, source = build_phone(args, chirp_at=chirp_at)
    sink = _sink_for(args, open_sink)
    console = _Console(args.quiet, args.json)
    started = time.monotonic()
    if sink is not None:
        phone.on_track = lambda s, track: _attach(sink, track, s)
    async with phone:
        console.line(f"calling {args.user} …")
        try:
            session = await phone.call(args.user)
        except QCallError as exc:
            _emit(args, {"connected": False, "error": str(exc), "peer": args.user})
            raise
        setup_ms = round((time.monotonic() - started) * 1000, 1)
        console.always(_summary(session))
        how = await _supervise(session, args.seconds, console)
    if sink is not None:
        await sink.stop()
    extra: dict[str, Any] = {"connected": True, "setup_ms": setup_ms}
    if source is not None and hasattr(source, "chirp_send_times"):
        extra["chirp_send_times"] = list(source.chirp_send_times)
        extra["tone_hz"] = args.tone
        extra["sent_seconds"] = round(source.seconds_sent, 2)
    _emit(args, _report(session, how, extra))
    console.line(f"call ended ({how})")
    if how == SIGNAL_HANGUP:
        _stopped(f"hung up the call to {args.user}")
    if session.status.error:
        raise QCallError(session.status.error)
    return 0


#: Audio warnings already given by this process (each is given once, not every call).
_WARNED: set[str] = set()


def _warn_once(kind: str, text: str, *values: object) -> None:
    if kind in _WARNED:
        logger.debug(text, *values)
        return
    _WARNED.add(kind)
    logger.warning(text, *values)


def _sink_for(args: argparse.Namespace, open_sink: Any) -> Any:
    if getattr(args, "no_speaker", False) and not args.output and args.output_device is None:
        return None
    if args.output or args.output_device is not None:
        return open_sink(args)
    try:
        return open_sink(args)
    except MediaError as exc:
        _warn_once(
            "speaker", "no audio output (%s); received audio is discarded (--no-speaker: "
            "no warning)", exc,
        )  # fmt: skip
        return None


_SINK_TASKS: set[asyncio.Future[Any]] = set()


def _attach(sink: Any, track: Any, session: Any = None) -> None:
    if session is not None:
        session.sink = sink  # its underruns go into the status and report
    sink.addTrack(track)
    task = asyncio.ensure_future(sink.start())
    _SINK_TASKS.add(task)
    task.add_done_callback(_SINK_TASKS.discard)


def recording_path(
    template: str, peer: str, when: float, index: int, *, once: bool = False
) -> Path:
    """The WAV file of one received call: ``listen --output`` gives one per call.

    ``template`` may name ``{peer}``, ``{time}`` (``YYYYmmdd-HHMMSS``, local time)
    and ``{n}`` (the call's number since ``listen`` started), e.g.
    ``calls/{time}-{peer}.wav``. A plain name is used as it is with ``--once``;
    otherwise the time and peer are added before ``.wav`` (``rec.wav`` →
    ``rec-20261205-130455-bob.wav``). An existing file is never replaced: ``-2``,
    ``-3``… are added instead (except the plain ``--once`` name).

    Raises:
        ConfigError: the template names an unknown field.
    """
    safe_peer = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in peer) or "peer"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    if "{" in template:
        try:
            path = Path(template.format(peer=safe_peer, time=stamp, n=index))
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"--output {template}: unknown field {exc} (use {{peer}}, {{time}}, {{n}})"
            ) from None
    elif once:
        return Path(template)
    else:
        plain = Path(template)
        path = plain.with_name(f"{plain.stem}-{stamp}-{safe_peer}{plain.suffix}")
    candidate, extra = path, 1
    while candidate.exists():
        extra += 1
        candidate = path.with_name(f"{path.stem}-{extra}{path.suffix}")
    return candidate


class _Recording:
    """One call's WAV: written to a hidden temporary file, moved into place at the end
    only if audio arrived (a refused or failed call never replaces a recording)."""

    def __init__(self, args: argparse.Namespace, final: Path, open_sink: Any) -> None:
        self.final = final
        self.part = final.with_name(f".{final.stem}.part{final.suffix}")
        self.sink = open_sink(args, output=self.part)

    async def finish(self) -> Path | None:
        """Stop the sink; return the recording's path, or ``None`` (nothing heard)."""
        await self.sink.stop()
        if getattr(self.sink, "samples_written", 0) > 0:
            self.part.replace(self.final)
            return self.final
        with contextlib.suppress(FileNotFoundError):
            self.part.unlink()
        return None


async def _listen(args: argparse.Namespace) -> int:
    from qcall.call.media import open_sink

    phone, _ = build_phone(args)
    console = _Console(args.quiet, args.json)
    if args.output:  # a bad name or template fails now, not when a call comes in
        if Path(args.output).suffix.lower() != ".wav":
            raise ConfigError(f"--output {args.output}: only WAV is written; name it *.wav")
        recording_path(args.output, "peer", time.time(), 0, once=args.once)
    sinks: dict[int, Any] = {}  # id(session) -> speaker sink or _Recording
    calls = [0]

    def on_track(session: Any, track: Any) -> None:
        if args.output:
            calls[0] += 1
            final = recording_path(args.output, session.peer, time.time(), calls[0],
                                   once=args.once)  # fmt: skip
            sink: Any = _Recording(args, final, open_sink)
            _attach(sink.sink, track, session)
        else:
            sink = _sink_for(args, open_sink)
            if sink is None:
                return
            _attach(sink, track, session)
        sinks[id(session)] = sink

    phone.on_track = on_track

    async def finish(key: int) -> dict[str, Any]:
        sink = sinks.pop(key, None)
        if sink is None:
            return {}
        if not isinstance(sink, _Recording):
            await sink.stop()
            return {}
        path = await sink.finish()
        extra: dict[str, Any] = {"output": None if path is None else str(path)}
        arrivals = getattr(sink.sink, "arrivals", None)
        if arrivals is not None:
            extra["arrivals"] = [
                [a.pts, a.sample_offset, a.samples, a.arrival_time] for a in arrivals
            ]
        return extra

    async def decide(invite: Any) -> bool:
        if args.auto_answer:
            return True
        console.line(f"incoming call from {invite.peer}: answer? [y/N] ")
        answer = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        return answer.strip().lower() in ("y", "yes")

    status = 0
    async with phone:
        console.line(f"listening as {phone.name} on {phone.signaling.url} (Ctrl-C to stop)")
        while True:
            try:
                session = await _until_signal(phone.incoming(decide))
            except QCallError as exc:
                for key in list(sinks):  # the failed call's sink: keep no empty file
                    await finish(key)
                console.line(f"incoming call failed: {exc}")
                status = 1
                if args.once:
                    _emit(args, {"connected": False, "error": str(exc)})
                    break
                continue
            if session is None:
                _stopped(f"stopped listening as {phone.name}")
                break
            console.always(_summary(session))
            how = await _supervise(session, args.seconds, console)
            extra: dict[str, Any] = {"connected": True}
            extra.update(await finish(id(session)))
            for key in list(sinks):  # calls that never reached this loop
                await finish(key)
            _emit(args, _report(session, how, extra))
            console.line(f"call ended ({how})")
            if session.status.error:
                status = 1
            if console.interrupted:  # Ctrl-C / SIGTERM in a call stops listening too
                ended = "hung up the call with" if how == SIGNAL_HANGUP else "call ended with"
                _stopped(f"{ended} {session.peer}; stopped listening as {phone.name}")
                break
            if args.once:
                break
        for key in list(sinks):
            await finish(key)
    return status


async def _until_signal(coro: Any) -> Any:
    """Await ``coro``; on Ctrl-C / SIGTERM cancel it and return ``None``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


def run_call(args: argparse.Namespace) -> int:
    return asyncio.run(_call(args))


def run_listen(args: argparse.Namespace) -> int:
    return asyncio.run(_listen(args))
