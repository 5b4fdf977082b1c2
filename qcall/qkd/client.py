"""Pluggable QKD key sources: the :class:`KeySource` interface, its registry, ETSI 014.

Every source of QKD keys (an ETSI GS QKD 014 KME, a pre-loaded key file, …)
implements :class:`KeySource`; callers pick one by configuration::

    async with open_key_source({"url": "https://kme-a:8443", "cert": "alice.pem",
                                "key": "alice.key", "ca": "ca.pem"}) as source:
        key = await source.get_key("bob")             # master side: new key
    async with open_key_source("keyfile:/path/keys.json") as source:
        key = await source.get_key_by_id("alice", key_id)   # slave side

A new device type is one new class: subclass :class:`KeySource`, implement
``from_config``, the three key methods and ``close``, and decorate it with
:func:`register_key_source` naming its ``type`` and URL schemes.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp

from qcall._aio import AsyncClosing
from qcall.exceptions import (
    ConfigError,
    KMEBadRequestError,
    KMEConnectionError,
    KMEError,
    KMEResponseError,
    KMEUnauthorizedError,
    KMEUnavailableError,
)
from qcall.qkd.etsi014 import (
    API_PREFIX,
    APPLICATION_EXTENSION,
    KeyRequest,
    KeyStatus,
    QKDKey,
    key_ids_json,
    parse_error,
    parse_key_container,
    parse_status,
    validate_application,
    validate_key_id,
    validate_sae_id,
)

__all__ = [
    "ETSI014Client",
    "KeySource",
    "key_source_types",
    "open_key_source",
    "register_key_source",
]

logger = logging.getLogger(__name__)

#: Largest KME answer read, in bytes.
MAX_RESPONSE: Final = 4 * 1024 * 1024

#: Why a KME refused our client certificate, by its TLS alert (OpenSSL reason ``…_ALERT_<X>``).
_ALERTS: Final = {
    "UNKNOWN_CA": "it is signed by a CA the KME does not trust",
    "BAD_CERTIFICATE": "the KME finds it bad (signed by another CA, or not a client certificate)",
    "CERTIFICATE_EXPIRED": "it has expired (or is not valid yet)",
    "UNSUPPORTED_CERTIFICATE": "it is not a TLS client certificate (extendedKeyUsage clientAuth)",
    "CERTIFICATE_REQUIRED": "we sent none (give a certificate and its key)",
}

#: Why a KME may drop us in the TLS handshake when it sends no alert.
_MAYBE: Final = (
    "it closed the connection without an answer; the certificate may be signed by a CA "
    "the KME does not trust, expired (or not valid yet), or not a TLS client certificate "
    "(extendedKeyUsage clientAuth)"
)


class KeySource(AsyncClosing, abc.ABC):
    """A source of QKD keys shared with peer SAEs (the one interface, DESIGN "quantum layer").

    The two ends of a key use it in ETSI GS QKD 014 roles: the *master* calls
    :meth:`get_key` (``enc_keys``) and sends the key_ID to the peer; the
    *slave* calls :meth:`get_key_by_id` (``dec_keys``) with it. A key is
    delivered once to each side. Use it as an async context manager or call
    :meth:`close`.

    Class attributes:
        type_name: the configuration ``type`` naming this source.
        schemes: URL schemes that select this source in :func:`open_key_source`.
    """

    type_name: ClassVar[str] = ""
    schemes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: Mapping[str, Any]) -> KeySource:
        """Build the source from a configuration mapping (``type``/``url`` + options).

        Raises:
            ConfigError: a required option is missing or invalid.
        """

    @abc.abstractmethod
    async def get_keys(
        self,
        peer_sae: str,
        number: int = 1,
        size_bits: int | None = None,
        *,
        application: str | None = None,
    ) -> list[QKDKey]:
        """Get ``number`` new keys shared with ``peer_sae`` (ETSI 014 ``enc_keys``).

        Args:
            peer_sae: the slave SAE that will fetch the keys by key_ID.
            number: how many keys.
            size_bits: key size; ``None`` means the source's default.
            application: what the keys are for (``call-setup``, ``rekey``,
                ``message``, ``otp``...), for the KME's key accounting; a source
                without a KME ignores it.

        Raises:
            QKDError: a subclass saying what failed (no key left, KME error, …).
        """

    @abc.abstractmethod
    async def get_keys_by_id(
        self, peer_sae: str, key_ids: Sequence[str], *, application: str | None = None
    ) -> list[QKDKey]:
        """Get the keys that ``peer_sae`` obtained with :meth:`get_keys` (``dec_keys``).

        Returns the keys in the order of ``key_ids``. ``application``: as for
        :meth:`get_keys`.

        Raises:
            KeyNotFoundError | KMEBadRequestError: a key_ID is unknown or consumed.
            QKDError: any other failure.
        """

    @abc.abstractmethod
    async def status(self, peer_sae: str) -> KeyStatus:
        """Report the key supply shared with ``peer_sae`` (ETSI 014 Status, 6.1)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and files. Safe to call twice."""

    async def get_key(
        self, peer_sae: str, size_bits: int | None = None, *, application: str | None = None
    ) -> QKDKey:
        """Get one new key shared with ``peer_sae``; see :meth:`get_keys`."""
        (key,) = await self.get_keys(peer_sae, 1, size_bits, application=application)
        return key

    async def get_key_by_id(
        self, peer_sae: str, key_id: str, *, application: str | None = None
    ) -> QKDKey:
        """Get the key ``key_id`` that ``peer_sae`` obtained; see :meth:`get_keys_by_id`."""
        (key,) = await self.get_keys_by_id(peer_sae, [key_id], application=application)
        return key


_T = TypeVar("_T", bound=type[KeySource])

_TYPES: dict[str, type[KeySource]] = {}
_SCHEMES: dict[str, type[KeySource]] = {}


def register_key_source(cls: _T) -> _T:
    """Class decorator: make ``cls`` selectable by its ``type`` and ``schemes``."""
    if not cls.type_name:
        raise ValueError(f"{cls.__name__} has no type")
    _TYPES[cls.type_name] = cls
    for scheme in cls.schemes:
        _SCHEMES[scheme] = cls
    return cls


def key_source_types() -> dict[str, type[KeySource]]:
    """Return the registered key source classes by ``type``."""
    _load_builtin()
    return dict(_TYPES)


def _load_builtin() -> None:
    # The key file source registers itself on import; keep the import lazy
    # so that importing this module stays cheap and cycle-free.
    import qcall.qkd.keyfile  # noqa: F401


def open_key_source(config: Mapping[str, Any] | str, **options: Any) -> KeySource:
    """Create the key source that ``config`` names.

    Args:
        config: a URL (``https://kme:8443`` → ETSI 014, ``keyfile:PATH`` → key
            file) or a mapping with ``type`` (``"etsi014"``, ``"keyfile"``) or
            ``url``, plus the source's options (see each ``from_config``).
        options: extra options merged over a mapping or given with a URL.

    Raises:
        ConfigError: unknown type or scheme, or invalid options.
    """
    _load_builtin()
    conf: dict[str, Any] = {"url": config} if isinstance(config, str) else dict(config)
    conf.update(options)
    kind = conf.get("type")
    if kind is not None:
        cls = _TYPES.get(str(kind))
        if cls is None:
            raise ConfigError(f"unknown key source type {kind!r}; known: {sorted(_TYPES)}")
        return cls.from_config(conf)
    url = conf.get("url")
    if not isinstance(url, str) or ":" not in url:
        raise ConfigError("key source config needs a 'type' or a 'url' with a scheme")
    scheme = url.split(":", 1)[0].lower()
    cls = _SCHEMES.get(scheme)
    if cls is None:
        raise ConfigError(f"no key source for URL scheme {scheme!r}; known: {sorted(_SCHEMES)}")
    return cls.from_config(conf)


# --- ETSI GS QKD 014 ---------------------------------------------------------------


def _describe_details(details: Sequence[object], limit: int = 300) -> str:
    """The ``details`` of a KME's Error object (6.5) as one printable line.

    Each detail (usually an object such as ``{"size": "must be a multiple of 8"}``)
    becomes ``key: value``; control characters are dropped and the whole is cut
    to ``limit`` characters, since a KME's answer is untrusted input.
    """
    parts: list[str] = []
    for detail in details:
        if isinstance(detail, Mapping):
            parts.extend(f"{key}: {value}" for key, value in detail.items())
        else:
            parts.append(str(detail))
    text = "; ".join(parts)
    text = "".join(ch for ch in text if ch.isprintable())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_count(number: int, what: str = "number") -> None:
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ConfigError(f"{what} must be a positive integer")


@register_key_source
class ETSI014Client(KeySource):
    """An SAE's client of an ETSI GS QKD 014 V1.1.1 KME (HTTPS with mutual TLS).

    Args:
        url: the KME base URL, ``https://host:port`` (a path prefix is kept).
        ssl_context: client context with our SAE certificate and the CA
            (:func:`qcall.qkd.pki.client_ssl_context`); ``None`` only for a
            plain-HTTP URL (tests, benchmarks).
        server_name: the name to verify the KME certificate against
            (default: the URL host).
        timeout: seconds for each whole request.
        method: ``"POST"`` (default) or ``"GET"`` for ``enc_keys``/``dec_keys``.
        headers: extra HTTP headers (e.g. for a plain-HTTP benchmark).
        certificate: the file of our client certificate, named in errors (a
            KME refusing it in the TLS handshake is a common set-up mistake).

    Errors (all :class:`~qcall.exceptions.QKDError`): 400 →
    :class:`KMEBadRequestError` (with the spec's ``message``/``details``),
    401 → :class:`KMEUnauthorizedError`, 503 → :class:`KMEUnavailableError`,
    other statuses → :class:`KMEError`; refused, TLS failure (the KME refusing
    our certificate said as such), timeout → :class:`KMEConnectionError`;
    malformed JSON, wrong count or size, bad, duplicate or missing key_IDs →
    :class:`KMEResponseError`.
    """

    type_name = "etsi014"
    schemes = ("https", "http")

    def __init__(
        self,
        url: str,
        ssl_context: ssl.SSLContext | None = None,
        *,
        server_name: str | None = None,
        timeout: float = 10.0,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        certificate: str | os.PathLike[str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError(f"KME URL must be https://HOST[:PORT], not {url!r}")
        if parts.scheme == "https" and ssl_context is None:
            raise ConfigError("an https KME needs a client certificate, key and CA")
        if method not in ("POST", "GET"):
            raise ConfigError("method must be POST or GET")
        self.url = url.rstrip("/")
        self._base = self.url + API_PREFIX
        self._ssl: ssl.SSLContext | bool = False
        if parts.scheme == "https" and ssl_context is not None:
            self._ssl = ssl_context
        self.server_name = server_name
        self.timeout = timeout
        self.method = method
        self._headers = dict(headers or {})
        self.certificate = None if certificate is None else os.fspath(certificate)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"ETSI014Client({self.url!r})"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ETSI014Client:
        """Options: ``url`` (required), ``cert``, ``key``, ``ca`` (required for
        https), ``server_name``, ``timeout``, ``method``."""
        url = config.get("url")
        if not isinstance(url, str):
            raise ConfigError("etsi014 key source needs 'url'")
        ctx = None
        if url.lower().startswith("http:") and any(config.get(k) for k in ("cert", "key", "ca")):
            raise ConfigError(
                f"KME URL {url} is not https://, but a client certificate, key or CA was "
                "given: an ETSI 014 KME is reached over https:// with mutual TLS"
            )
        if url.lower().startswith("https:"):
            missing = [k for k in ("cert", "key", "ca") if not config.get(k)]
            if missing:
                raise ConfigError(f"etsi014 key source needs {', '.join(missing)}")
            from qcall.qkd.pki import client_ssl_context

            ctx = client_ssl_context(config["cert"], config["key"], config["ca"])
        try:
            timeout = float(config.get("timeout", 10.0))
        except (TypeError, ValueError):
            raise ConfigError("timeout must be a number of seconds") from None
        return cls(
            url,
            ctx,
            server_name=config.get("server_name"),
            timeout=timeout,
            method=str(config.get("method", "POST")).upper(),
            certificate=config.get("cert"),
        )

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=16, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers=self._headers,
                json_serialize=json.dumps,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        http_method: str,
        sae: str,
        endpoint: str,
        *,
        body: Any = None,
        params: Sequence[tuple[str, str]] | None = None,
    ) -> Any:
        try:
            sae_id = validate_sae_id(sae)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        url = f"{self._base}/{quote(sae_id, safe='')}/{endpoint}"
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["data"] = json.dumps(body)
            kwargs["headers"] = {"Content-Type": "application/json"}
        if params:
            kwargs["params"] = list(params)
        if self.server_name:
            kwargs["server_hostname"] = self.server_name
        where = f"KME {self.url}"
        try:
            async with self._get_session().request(http_method, url, **kwargs) as resp:
                status = resp.status
                raw = await _read_limited(resp, where)
        except TimeoutError:
            raise KMEConnectionError(f"{where} did not answer within {self.timeout:g} s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise KMEConnectionError(
                f"{where}: TLS certificate check failed: {exc.certificate_error}"
            ) from None
        except aiohttp.ClientConnectorSSLError as exc:
            why = _alert(exc.os_error)
            if why is not None:
                raise KMEConnectionError(self._refused(why)) from None
            raise KMEConnectionError(f"{where}: TLS handshake failed: {exc.os_error}") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionResetError) and await self._drops_us():
                raise KMEConnectionError(self._refused(_MAYBE)) from None  # TLS 1.2
            reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
            raise KMEConnectionError(f"cannot connect to {where}: {reason}") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # TLS 1.3: the KME checks our certificate after our side of the
            # handshake is done, so a refusal shows as a dropped connection.
            why = _alert(exc.__cause__ or exc.__context__)
            if why is None and await self._drops_us():
                why = _MAYBE
            if why is not None:
                raise KMEConnectionError(self._refused(why)) from None
            hint = ""
            if self.url.lower().startswith("http://"):
                hint = "; an ETSI 014 KME is reached over https:// (mutual TLS): check the URL"
            raise KMEConnectionError(
                f"{where} closed the connection without answering {endpoint} ({exc}){hint}"
            ) from None
        except aiohttp.ClientError as exc:
            raise KMEConnectionError(f"{where}: {type(exc).__name__}: {exc}") from None
        except ssl.SSLError as exc:
            why = _alert(exc)
            text = self._refused(why) if why else f"{where}: TLS error: {exc.reason}"
            raise KMEConnectionError(text) from None
        except OSError as exc:
            raise KMEConnectionError(f"{where}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = _NOT_JSON
        if status == 200:
            if data is _NOT_JSON:
                raise KMEResponseError(f"{where} sent malformed JSON to {endpoint}")
            return data
        message, details = parse_error(data) if data is not _NOT_JSON else (None, [])
        text = f"{where} answered {status} to {endpoint}" + (f": {message}" if message else "")
        if details:
            text += f" ({_describe_details(details)})"
        error_cls: type[KMEError] = {
            400: KMEBadRequestError,
            401: KMEUnauthorizedError,
            503: KMEUnavailableError,
        }.get(status, KMEError)
        raise error_cls(text, status=status, message=message, details=details)

    def _refused(self, why: str) -> str:
        """The message for "the KME refused our client certificate": ``why``, URL and file."""
        ours = f" {self.certificate}" if self.certificate else ""
        return f"KME {self.url} refused our client certificate{ours} in the TLS handshake: {why}"

    async def _drops_us(self) -> bool:
        """Whether the KME drops a fresh TLS connection of ours without answering HTTP.

        A KME that accepted our certificate answers any request, even a bad
        one; one that refused it closes the connection. An asyncio server (our
        KME) sends no TLS alert, so this probe is what tells a refusal from a
        connection dropped for another reason. Called only after a failure.
        """
        if not isinstance(self._ssl, ssl.SSLContext):
            return False
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        request = f"GET {API_PREFIX}/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(min(self.timeout, 5.0)):
                reader, writer = await asyncio.open_connection(
                    host, parts.port or 443, ssl=self._ssl, server_hostname=self.server_name or host
                )
                writer.write(request.encode())
                return not await reader.read(1)
        except ssl.SSLCertVerificationError:
            return False  # our check of the KME failed: reported as such
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True  # dropped in the handshake (TLS 1.2) or by an alert
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()

    async def get_status(self, slave_sae: str) -> KeyStatus:
        """5.1 Get status: ``GET /api/v1/keys/{slave_SAE_ID}/status``."""
        return parse_status(await self._request("GET", slave_sae, "status"))

    async def status(self, peer_sae: str) -> KeyStatus:
        return await self.get_status(peer_sae)

    async def enc_keys(self, slave_sae: str, request: KeyRequest) -> list[QKDKey]:
        """5.2 Get key: ``enc_keys`` with a full Key request (6.2).

        The answer must hold exactly ``request.number`` keys of
        ``request.size`` bits (if given) with distinct UUID key_IDs.
        """
        _check_count(request.number)
        if self.method == "GET" and (
            request.additional_slave_sae_ids
            or request.extension_mandatory
            or request.extension_optional
        ):
            raise ConfigError("enc_keys with SAE IDs or extensions needs POST")
        if self.method == "POST":
            data = await self._request("POST", slave_sae, "enc_keys", body=request.to_json())
        else:
            params = [("number", str(request.number))]
            if request.size is not None:
                params.append(("size", str(request.size)))
            data = await self._request("GET", slave_sae, "enc_keys", params=params)
        container = parse_key_container(
            data, expected_number=request.number, expected_size=request.size
        )
        return list(container.keys)

    async def get_keys(
        self,
        peer_sae: str,
        number: int = 1,
        size_bits: int | None = None,
        *,
        application: str | None = None,
    ) -> list[QKDKey]:
        """``enc_keys``; ``application`` travels as ``extension_optional`` (POST only)."""
        _check_count(number)
        extension: tuple[dict[str, str], ...] = ()
        if application is not None and self.method == "POST":
            extension = ({APPLICATION_EXTENSION: _application(application)},)
        request = KeyRequest(number=number, size=size_bits, extension_optional=extension)
        keys = await self.enc_keys(peer_sae, request)
        logger.debug("< enc_keys %s %s", peer_sae, [k.key_id for k in keys])
        return keys

    async def get_keys_by_id(
        self, peer_sae: str, key_ids: Sequence[str], *, application: str | None = None
    ) -> list[QKDKey]:
        """5.3 Get key with key IDs: ``dec_keys``; answer must hold exactly ``key_ids``.

        ``application`` travels as ``key_IDs_extension`` (POST only).
        """
        if not key_ids:
            raise ConfigError("key_ids is empty")
        try:
            ids = [validate_key_id(k, canonical=False) for k in key_ids]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if len({i.lower() for i in ids}) != len(ids):
            raise ConfigError("duplicate key_ID in request")
        if self.method == "POST":
            tag = None if application is None else _application(application)
            data = await self._request("POST", peer_sae, "dec_keys", body=key_ids_json(ids, tag))
        else:
            params = [("key_ID", k) for k in ids]
            data = await self._request("GET", peer_sae, "dec_keys", params=params)
        keys = list(parse_key_container(data, expected_ids=ids).keys)
        logger.debug("< dec_keys %s %s", peer_sae, [k.key_id for k in keys])
        return keys


_NOT_JSON: Final = object()


def _application(name: str) -> str:
    try:
        return validate_application(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _alert(error: BaseException | None) -> str | None:
    """If ``error`` is the KME's TLS alert about our certificate, say why it refused it."""
    reason = getattr(error, "reason", None)
    if not isinstance(error, ssl.SSLError) or not isinstance(reason, str):
        return None
    for code, why in _ALERTS.items():
        if f"ALERT_{code}" in reason:
            return f"{why} (TLS alert {reason.lower()})"
    return None


async def _read_limited(resp: aiohttp.ClientResponse, where: str) -> bytes:
    """Read the body; refuse one larger than :data:`MAX_RESPONSE` (hostile KME)."""
    too_large = KMEResponseError(f"{where} sent an answer larger than {MAX_RESPONSE} bytes")
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.read(MAX_RESPONSE + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise too_large
    return b"".join(chunks)
