"""CPU cost of each step of aiortc's DTLS start and handshake, in memory (no network).

What ``RTCDtlsTransport.start`` does before its first flight (the ``SSL.Context``:
``RTCCertificate._create_ssl_context``; the ``SSL.Connection``) and what each
side's handshake steps cost, on fresh certificates, as aiortc 1.16 builds them.
``qcall.call.fast_transport.prebuild_dtls_contexts`` moves the first off the path
(docs/performance.md, "Set-up speed: round 6")::

    python scripts/dtls_start_cost.py --rounds 60
"""

from __future__ import annotations

import argparse
import statistics
import time

from aiortc.rtcdtlstransport import SRTP_PROFILES, RTCCertificate
from OpenSSL import SSL

STEPS = ("ctx", "connection", "client_hello", "server_flight", "client_final", "server_final")


def _pump(src: SSL.Connection, dst: SSL.Connection) -> None:
    while True:
        try:
            data = src.bio_read(1500)
        except SSL.WantReadError:
            return
        dst.bio_write(data)


def _step(conn: SSL.Connection) -> None:
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass


def measure(rounds: int) -> dict[str, list[float]]:
    """Seconds per step, ``rounds`` handshakes (client = callee, server = caller)."""
    rows: dict[str, list[float]] = {name: [] for name in STEPS}

    def timed(name: str, start: float) -> None:
        rows[name].append(time.perf_counter() - start)

    for _ in range(rounds):
        a, b = RTCCertificate.generateCertificate(), RTCCertificate.generateCertificate()
        t = time.perf_counter()
        client_ctx = a._create_ssl_context(SRTP_PROFILES)
        timed("ctx", t)
        server = SSL.Connection(b._create_ssl_context(SRTP_PROFILES))
        server.set_accept_state()
        t = time.perf_counter()
        client = SSL.Connection(client_ctx)
        client.set_connect_state()
        timed("connection", t)
        for name, conn, peer in (
            ("client_hello", client, server),
            ("server_flight", server, client),
            ("client_final", client, server),
            ("server_final", server, client),
        ):
            t = time.perf_counter()
            _step(conn)
            timed(name, t)
            _pump(conn, peer)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    for name, values in measure(args.rounds).items():
        print(
            f"{name:14s} median {statistics.median(values) * 1e3:.3f} ms"
            f"  min {min(values) * 1e3:.3f} ms"
        )


if __name__ == "__main__":
    main()
