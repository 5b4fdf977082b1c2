"""Start real Redis, PostgreSQL and coturn servers on loopback ports, for tests and demos.

Each class runs the server from Debian's package (``redis-server``, PostgreSQL's
``initdb``/``postgres``, ``turnserver``) in a temporary folder of its own, waits
until it accepts TCP connections, and stops it (SIGTERM, then SIGKILL) on
:meth:`LocalService.stop`. They are context managers::

    with LocalRedis() as redis, LocalPostgres() as pg:
        print(redis.url, pg.url)     # redis://127.0.0.1:PORT/0 postgresql://qcall@127.0.0.1:PORT/qcall

PostgreSQL refuses to run as root: when this process is root, ``initdb`` and
``postgres`` run as the unprivileged user ``nobody`` (``setpriv``), in a
folder under the system temporary directory owned by that user.

Nothing here is used by the signaling server itself; ``scripts/scale_demo.sh``
and the tests use it. Every class raises :class:`~qcall.exceptions.ServiceError`
naming the program when it is missing or does not start (with its log's tail).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from qcall.exceptions import ServiceError

__all__ = [
    "LocalPostgres",
    "LocalRedis",
    "LocalService",
    "LocalTurn",
    "free_port",
    "postgres_bin",
]

#: Where PostgreSQL's programs are looked for, after ``PATH``.
POSTGRES_DIRS = (
    "/usr/local/bin",
    *sorted(str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")),
)
#: The unprivileged user PostgreSQL runs as when this process is root.
UNPRIVILEGED_USER = "nobody"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (and UDP too, for coturn)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            return port


def postgres_bin(program: str) -> str:
    """The path of PostgreSQL's ``program`` (``initdb``, ``postgres``).

    Raises:
        ServiceError: PostgreSQL is not installed (``apt-get install postgresql``).
    """
    found = shutil.which(program) or next(
        (f"{d}/{program}" for d in POSTGRES_DIRS if os.access(f"{d}/{program}", os.X_OK)), None
    )
    if found is None:
        raise ServiceError(f"{program} not found: install PostgreSQL (apt-get install postgresql)")
    return found


def _wait_tcp(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.02)
    return False


class LocalService:
    """One server process in a temporary folder (see the module docstring).

    Args:
        host: the address to listen on (a loopback address unless a test made
            network namespaces).
        port: the TCP port (0: a free one).
        start_timeout: seconds to wait for the server to accept connections.
    """

    name = "service"
    #: The signal of a clean stop.
    stop_signal = signal.SIGTERM

    def __init__(self, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 20.0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.start_timeout = start_timeout
        self.dir = Path(tempfile.mkdtemp(prefix=f"qcall-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Path = self.dir / "server.log"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port}>"

    def command(self) -> list[str]:
        """The server's command line."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Work before the first start (PostgreSQL: ``initdb``)."""

    def preexec(self) -> list[str]:
        """A prefix of :meth:`command` (PostgreSQL as root: drop privileges)."""
        return []

    def start(self) -> None:
        """Start the server (again, after :meth:`stop` or :meth:`kill`) and wait for it.

        Raises:
            ServiceError: it exited or did not listen within ``start_timeout``.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            try:
                probe.bind((self.host, self.port))  # else we would wait for another server
            except OSError as exc:
                raise ServiceError(
                    f"{self.name} did not start on {self.host}:{self.port}: {exc.strerror}"
                ) from None
        if self.proc is None and not (self.dir / ".prepared").exists():
            self.prepare()
            (self.dir / ".prepared").touch()
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.preexec(), *self.command()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if not _wait_tcp(self.host, self.port, self.proc, self.start_timeout):
            self.kill()
            raise ServiceError(
                f"{self.name} did not start on {self.host}:{self.port}: {self.log_tail()}"
            )

    def log_tail(self, lines: int = 8) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            text = self._log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server cleanly (SIGTERM), killing it after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(self.stop_signal)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LocalRedis(LocalService):
    """``redis-server`` without persistence; :attr:`url` is ``redis://HOST:PORT/0``."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        program = shutil.which("redis-server")
        if program is None:
            raise ServiceError("redis-server not found: apt-get install redis-server")
        return [
            program, "--port", str(self.port), "--bind", self.host, "--dir", str(self.dir),
            "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
        ]  # fmt: skip


class LocalPostgres(LocalService):
    """A PostgreSQL cluster made by ``initdb``; :attr:`url` is its ``postgresql://`` URL.

    The superuser is ``qcall`` with trust authentication on loopback, and a
    database ``qcall`` exists. :meth:`create_database` makes more.
    """

    name = "postgres"
    user = "qcall"
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM would wait for every client

    def __init__(self, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0) -> None:
        super().__init__(host, port, start_timeout)
        self._uid: int | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam(UNPRIVILEGED_USER)
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.data = self.dir / "data"

    def url_for(self, database: str) -> str:
        """The URL of ``database`` on this server."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_for("qcall")

    def preexec(self) -> list[str]:
        if self._uid is None:
            return []
        return ["setpriv", f"--reuid={self._uid}", f"--regid={self._gid}", "--clear-groups"]

    def prepare(self) -> None:
        result = subprocess.run(
            [*self.preexec(), postgres_bin("initdb"), "-D", str(self.data), "-U", self.user,
             "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C"],
            capture_output=True,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            tail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise ServiceError(f"initdb failed in {self.data}: {' | '.join(tail)}")

    def command(self) -> list[str]:
        return [
            postgres_bin("postgres"), "-D", str(self.data), "-h", self.host, "-p", str(self.port),
            "-k", "", "-c", "fsync=off", "-c", "max_connections=200",
        ]  # fmt: skip

    def start(self) -> None:
        super().start()
        self._ready()

    def _ready(self) -> None:
        """Wait until the server accepts sessions, and make the ``qcall`` database once."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                self.create_database("qcall", exist_ok=True)
                return
            except ServiceError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        """Create the database ``name`` (letters, digits, ``_``); returns its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"bad database name {name!r}")
        import psycopg  # only where PostgreSQL is used

        try:
            with psycopg.connect(self.url_for("postgres"), autocommit=True) as db:
                exists = db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if exists.fetchone() is None:
                    db.execute(f'CREATE DATABASE "{name}"')
                elif not exist_ok:
                    raise ServiceError(f"database {name} exists on {self.host}:{self.port}")
        except psycopg.Error as exc:
            raise ServiceError(f"PostgreSQL on {self.host}:{self.port}: {exc}") from exc
        return self.url_for(name)


class LocalTurn(LocalService):
    """coturn's ``turnserver`` with the REST shared secret (``use-auth-secret``).

    Args:
        secret: the ``static-auth-secret`` shared with the signaling server.
        realm: the TURN realm.
        relay_ip: the address relayed ports are opened on (default ``host``).
        external_ip: ``external-ip`` when the server sits behind a NAT.
        allow_loopback: relay to loopback peers (tests on one machine).
    """

    name = "turn"

    def __init__(
        self,
        secret: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        realm: str = "qcall",
        relay_ip: str | None = None,
        min_port: int = 49152,
        max_port: int = 49252,
        allow_loopback: bool = True,
        start_timeout: float = 20.0,
    ) -> None:
        super().__init__(host, port, start_timeout)
        self.secret, self.realm = secret, realm
        self.relay_ip = relay_ip or host
        self.min_port, self.max_port = min_port, max_port
        self.allow_loopback = allow_loopback

    @property
    def url(self) -> str:
        return f"turn:{self.host}:{self.port}?transport=udp"

    def command(self) -> list[str]:
        program = shutil.which("turnserver")
        if program is None:
            raise ServiceError("turnserver not found: apt-get install coturn")
        args = [
            program, "-c", str(self._secret_file()),  # first: the secret stays off argv
            "--no-cli", "--no-tls", "--no-dtls", "--fingerprint",
            "--listening-ip", self.host, "--listening-port", str(self.port),
            "--relay-ip", self.relay_ip, "--min-port", str(self.min_port),
            "--max-port", str(self.max_port), "--use-auth-secret",
            "--realm", self.realm,
            "--pidfile", str(self.dir / "turnserver.pid"), "--log-file", "stdout",
            "--simple-log", "--no-stun-backward-compatibility",
        ]  # fmt: skip
        if self.allow_loopback:
            args.append("--allow-loopback-peers")
        return args

    def _secret_file(self) -> Path:
        """A config file (mode 0600) holding the secret: never on the command line."""
        path = self.dir / "turnserver.conf"
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as conf:
            conf.write(f"static-auth-secret={self.secret}\n")
        return path
