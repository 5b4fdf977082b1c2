"""A client of the transparency log's HTTPS API that trusts nothing it cannot check.

Every answer is verified before it is returned:

* a **receipt** (``add``) must carry a tree head signed by the configured log key
  and an inclusion proof from *this* entry to that head's root — a log that
  acknowledges an entry without including it is caught here;
* a **tree head** (``get_sth``) must be signed by the log key;
* ``verify_consistency(old, new)`` fetches and checks an RFC 9162 consistency
  proof between two heads;
* **entries** (``get_entries``) are parsed as hostile input.

Errors are :class:`~qcall.exceptions.LogError` (refused, unreachable, malformed
answer) or :class:`~qcall.exceptions.LogProofError` (an answer that does not verify).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from typing import Any, Final

import aiohttp

from qcall._aio import AsyncClosing
from qcall.exceptions import ConfigError, LogError, LogProofError, SealFormatError
from qcall.seal.log import Submission
from qcall.seal.logformat import LogEntry, LogKey, Receipt, TreeHead
from qcall.seal.logserver import API, MAX_ENTRIES, submission_json
from qcall.seal.merkle import verify_consistency
from qcall.seal.statement import b64decode

__all__ = ["LogClient", "client_tls_context"]

logger = logging.getLogger(__name__)

MAX_ANSWER: Final = 16 * 1024 * 1024


def client_tls_context(ca: str | None) -> ssl.SSLContext:
    """Verify the log's TLS certificate against ``ca`` (default: the system's CAs).

    Raises:
        ConfigError: the CA file cannot be read.
    """
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the log's TLS CA {ca}: {exc}") from exc
    return ctx


class LogClient(AsyncClosing):
    """Talk to one transparency log (usable as an async context manager).

    Args:
        url: the log's base URL (``https://host:port``).
        log_key: the log's public key, as the user trusts it.
        ssl_context: :func:`client_tls_context` (``None`` for ``http://``).
        timeout: seconds per request.
    """

    def __init__(
        self,
        url: str,
        log_key: LogKey,
        ssl_context: ssl.SSLContext | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.log_key = log_key
        self._logs = {log_key.log_id: log_key}
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"LogClient({self.url!r}, {self.log_key.name!r})"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            async with self._http().request(method, f"{self.url}{API}/{path}", **kwargs) as resp:
                raw = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    raw += chunk
                    if len(raw) > MAX_ANSWER:
                        break
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise LogError(f"cannot reach the seal log at {self.url}: {exc}") from exc
        if len(raw) > MAX_ANSWER:
            raise LogError(f"the seal log's answer to {path} is too large")
        try:
            obj = json.loads(raw)
        except ValueError:
            raise LogError(f"the seal log answered {path} with HTTP {status}, not JSON") from None
        if status != 200:
            message = obj.get("error") if isinstance(obj, dict) else None
            raise LogError(f"the seal log refused {path}: {message or status}", status=status)
        return obj

    # --- adding -------------------------------------------------------------------------

    def _receipt(self, obj: Any, sub: Submission) -> Receipt:
        if not isinstance(obj, dict):
            raise LogError("the seal log's answer is not an object")
        try:
            receipt = Receipt.from_json(obj.get("receipt"))
        except SealFormatError as exc:
            raise LogError(f"the seal log's receipt is malformed: {exc}") from None
        try:
            receipt.verify(sub.signed, self._logs)
        except LogProofError as exc:
            raise LogProofError(
                f"the seal log acknowledged the entry, but its receipt does not prove "
                f"inclusion: {exc}"
            ) from None
        return receipt

    async def add(self, submission: Submission) -> Receipt:
        """Add one entry; return its verified receipt.

        Raises:
            LogError: refused (the log's reason) or unreachable.
            LogProofError: the receipt does not prove inclusion.
        """
        obj = await self._call("POST", "add-entry", json=submission_json(submission))
        return self._receipt(obj, submission)

    async def add_many(self, submissions: list[Submission]) -> list[Receipt | LogError]:
        """Add up to 256 entries in one request; each result is a receipt or an error."""
        body = {"entries": [submission_json(s) for s in submissions]}
        obj = await self._call("POST", "add-entries", json=body)
        results = obj.get("results") if isinstance(obj, dict) else None
        if not isinstance(results, list) or len(results) != len(submissions):
            raise LogError("the seal log answered add-entries with the wrong number of results")
        out: list[Receipt | LogError] = []
        for item, sub in zip(results, submissions, strict=True):
            if isinstance(item, dict) and "error" in item:
                out.append(LogError(str(item["error"]), status=item.get("status")))
            else:
                out.append(self._receipt(item, sub))
        return out

    # --- reading ------------------------------------------------------------------------

    async def get_sth(self) -> TreeHead:
        """The latest tree head, its signature verified."""
        try:
            head = TreeHead.from_json(await self._call("GET", "get-sth"))
        except SealFormatError as exc:
            raise LogError(f"the seal log's tree head is malformed: {exc}") from None
        head.verify(self._logs)
        return head

    async def get_consistency(self, first: int, second: int) -> list[bytes]:
        obj = await self._call(
            "GET", "get-sth-consistency", params={"first": first, "second": second}
        )
        return _hashes(obj, "consistency")

    async def verify_consistency(self, old: TreeHead, new: TreeHead) -> None:
        """Check that ``new`` extends ``old`` (both already signature-checked).

        Raises:
            LogProofError: it does not (a fork or a rewritten history).
        """
        if old.tree_size > new.tree_size:
            old, new = new, old
        proof = (
            await self.get_consistency(old.tree_size, new.tree_size)
            if 0 < old.tree_size < new.tree_size
            else []
        )
        verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, proof)

    async def get_proof(self, leaf_hash: bytes, tree_size: int) -> tuple[int, list[bytes]]:
        obj = await self._call(
            "GET", "get-proof-by-hash", params={"hash": leaf_hash.hex(), "tree_size": tree_size}
        )
        index = obj.get("leaf_index") if isinstance(obj, dict) else None
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise LogError("the seal log's proof has no valid leaf_index")
        return index, _hashes(obj, "audit_path")

    async def get_entries(self, start: int, end: int) -> list[tuple[LogEntry, list[bytes]]]:
        """Entries ``start``..``end`` (inclusive; the log may return fewer), parsed."""
        obj = await self._call("GET", "get-entries", params={"start": start, "end": end})
        items = obj.get("entries") if isinstance(obj, dict) else None
        if not isinstance(items, list) or not items or len(items) > MAX_ENTRIES:
            raise LogError("the seal log's get-entries answer is malformed")
        out = []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, dict) or not isinstance(item.get("chain"), list):
                    raise SealFormatError("not an entry object")
                leaf = b64decode(item.get("leaf_input"), "leaf_input", 1 << 17)
                chain = [b64decode(c, "chain", 65536) for c in item["chain"]]
                out.append((LogEntry.parse(leaf), chain))
            except SealFormatError as exc:
                raise LogError(f"entry {start + i} from the seal log is malformed: {exc}") from None
        return out


def _hashes(obj: Any, name: str) -> list[bytes]:
    values = obj.get(name) if isinstance(obj, dict) else None
    if not isinstance(values, list) or len(values) > 64:
        raise LogError(f"the seal log's {name} is malformed")
    try:
        out = [bytes.fromhex(v) for v in values]
    except (TypeError, ValueError):
        raise LogError(f"the seal log's {name} is not hex") from None
    if any(len(h) != 32 for h in out):
        raise LogError(f"the seal log's {name} has hashes of the wrong size")
    return out


def leaf_input_b64(entry: LogEntry) -> str:
    """Base64 of an entry's leaf input (as ``get-entries`` returns it)."""
    return base64.b64encode(entry.encode()).decode()
