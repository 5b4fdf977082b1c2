"""Where approval workflows live between steps, and how approvers hear about them.

:class:`WorkflowStore` keeps each open workflow's current ``.qseal`` bundle in a
shared directory (``qcall seal setup --workflows DIR``; every participant points
at the same one — on one machine, or a network share), so a workflow survives
restarts and every approver sees every earlier decision::

    DIR/<workflow id>.qseal          the bundle so far (atomic writes)
    DIR/<workflow id>.json           {"document": path, "bundle": path of FILE.qseal}
    DIR/<workflow id>.lock           flock held during a decision (concurrent approvers)
    DIR/inbox/<user>/<id>.json       notices (DirectoryNotifier)

**Notifiers.** The workflow core emits :class:`~qcall.seal.workflow.Notify`
outputs; a :class:`Notifier` delivers them. :class:`DirectoryNotifier` (the
default, needs nothing else) drops a notice in the recipient's inbox directory,
which ``qcall seal inbox`` lists. :class:`MessagingNotifier` (chosen by
:func:`make_notifier` when a signaling server is configured) does the same and
also sends each notice to its recipient as an end-to-end encrypted qcall message
(docs/messaging.md, ``qcall inbox``), through a ``send(recipient, text)``
coroutine the caller provides (docs/seal.md §6.3).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from qcall import config
from qcall.exceptions import ConfigError, SealFormatError, WorkflowError
from qcall.seal.bundle import SealBundle
from qcall.seal.workflow import Notify

__all__ = [
    "DirectoryNotifier",
    "MessagingNotifier",
    "Notifier",
    "WorkflowStore",
    "make_notifier",
    "notice_text",
]

_ID = re.compile(r"[0-9a-f]{96}")
_PREFIX = re.compile(r"[0-9a-f]{8,96}")


class Notifier(Protocol):
    """Delivers a workflow notification to its recipient."""

    def notify(self, notice: Notify, bundle: SealBundle, document: str | None) -> None: ...


class WorkflowStore:
    """Open workflows in a shared directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"WorkflowStore({str(self.directory)!r})"

    def resolve(self, prefix: str) -> str:
        """The full workflow ID that ``prefix`` (≥ 8 hex digits) names.

        Raises:
            WorkflowError: no workflow, or more than one, matches.
        """
        prefix = prefix.strip().lower()
        if not _PREFIX.fullmatch(prefix):
            raise WorkflowError(f"{prefix!r} is not a workflow ID (at least 8 hex digits)")
        found = [p.stem for p in self.directory.glob(f"{prefix}*.qseal") if _ID.fullmatch(p.stem)]
        if not found:
            raise WorkflowError(f"no workflow {prefix} in {self.directory}")
        if len(found) > 1:
            raise WorkflowError(f"workflow ID {prefix} is ambiguous: give more digits")
        return found[0]

    def save(
        self, bundle: SealBundle, *, document: str | None = None, bundle_path: str | None = None
    ) -> str:
        """Store the bundle (and, the first time, where its document and file are)."""
        wid = bundle.workflow_id
        config.make_private_dir(self.directory)
        meta_path = self.directory / f"{wid}.json"
        if not meta_path.exists():
            meta = {"document": document, "bundle": bundle_path}
            config.atomic_write(meta_path, json.dumps(meta).encode(), mode=0o644)
        config.atomic_write(self.directory / f"{wid}.qseal", bundle.serialize(), mode=0o644)
        return wid

    def load(self, wid: str) -> tuple[SealBundle, dict[str, Any]]:
        """The bundle of a workflow and its metadata.

        Raises:
            WorkflowError: unknown workflow.
            SealFormatError: the stored bundle is corrupt.
        """
        path = self.directory / f"{wid}.qseal"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise WorkflowError(f"no workflow {wid[:16]} in {self.directory}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        bundle = SealBundle.parse(data, str(path))
        try:
            meta = json.loads((self.directory / f"{wid}.json").read_bytes())
        except (OSError, ValueError):
            meta = {}
        if not isinstance(meta, dict):
            raise SealFormatError(f"{self.directory / f'{wid}.json'} is corrupt")
        return bundle, meta

    @contextlib.contextmanager
    def locked(self, wid: str) -> Iterator[None]:
        """Hold the workflow's lock for a read-verify-decide-write."""
        config.make_private_dir(self.directory)
        fd = os.open(self.directory / f"{wid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class DirectoryNotifier:
    """The default notifier: a notice file per recipient and workflow in ``inbox/``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory) / "inbox"

    def notify(self, notice: Notify, bundle: SealBundle, document: str | None) -> None:
        box = config.make_private_dir(self.directory / notice.recipient)
        seal = bundle.seal.statement
        obj = {
            "workflow": notice.workflow_id,
            "what": notice.what,
            "detail": notice.detail,
            "document": seal.document_name,
            "document_path": document,
            "reason": seal.reason,
        }
        config.atomic_write(
            box / f"{notice.workflow_id}.json", json.dumps(obj).encode(), mode=0o644
        )

    def inbox(self, user: str) -> list[dict[str, Any]]:
        """The notices waiting for ``user``."""
        out = []
        for path in sorted((self.directory / user).glob("*.json")):
            try:
                obj = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue  # a corrupt notice is just noise: the workflow store is the truth
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def clear(self, user: str, wid: str) -> None:
        """Remove ``user``'s notice about ``wid``."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / user / f"{wid}.json").unlink()


def notice_text(notice: Notify, bundle: SealBundle, document: str | None) -> str:
    """The message text of a notice (what an approver reads in ``qcall inbox``)."""
    seal = bundle.seal.statement
    wid = notice.workflow_id[:16]
    about = f"{seal.document_name!r}" + (f" ({seal.reason})" if seal.reason else "")
    if notice.what == "review":
        where = f" --file {document}" if document else " --file DOCUMENT"
        return (
            f"[qcall seal] your approval is requested for {about}, workflow {wid}. "
            f"Review the document, then: qcall seal approve {wid}{where} "
            f"(or qcall seal reject {wid}{where})"
        )
    detail = f": {notice.detail}" if notice.detail else ""
    return f"[qcall seal] {about}, workflow {wid}: {notice.what}{detail}"


#: ``send(recipient, text)``: deliver one message (:meth:`MessagingClient.send_text`).
Send = Callable[[str, str], Awaitable[object]]


class MessagingNotifier(DirectoryNotifier):
    """Notices in ``inbox/`` as :class:`DirectoryNotifier`, and as qcall messages.

    :meth:`notify` is synchronous (the workflow code calls it): it writes the
    notice file and queues the message; :meth:`flush` sends what is queued.
    A message that cannot be sent is reported by :meth:`flush`; the notice file
    stays, so nothing is lost.
    """

    def __init__(self, directory: str | os.PathLike[str], send: Send) -> None:
        super().__init__(directory)
        self._send = send
        self.queued: list[tuple[str, str]] = []
        #: ``(recipient, text)`` of every message sent.
        self.sent: list[tuple[str, str]] = []

    def notify(self, notice: Notify, bundle: SealBundle, document: str | None) -> None:
        super().notify(notice, bundle, document)
        self.queued.append((notice.recipient, notice_text(notice, bundle, document)))

    async def flush(self) -> list[tuple[str, str]]:
        """Send the queued messages; returns ``(recipient, error)`` for those that failed."""
        from qcall.exceptions import QCallError

        failed = []
        queued, self.queued = self.queued, []
        for recipient, text in queued:
            try:
                await self._send(recipient, text)
            except QCallError as exc:
                failed.append((recipient, str(exc)))
            else:
                self.sent.append((recipient, text))
        return failed


def make_notifier(workflows: str | os.PathLike[str], send: Send | None = None) -> DirectoryNotifier:
    """The notifier ``qcall seal`` uses: with ``send`` (a signaling server is
    configured), a :class:`MessagingNotifier`."""
    if send is not None:
        return MessagingNotifier(workflows, send)
    return DirectoryNotifier(workflows)
