"""Seal approval requests sent as qcall messages through a real signaling server."""

from __future__ import annotations

from pathlib import Path

from qcall.messaging.api import MessageReceived
from qcall.seal.notify import MessagingNotifier, make_notifier
from qcall.seal.service import seal_document
from qcall.seal.statement import Mode, Policy
from qcall.seal.workflow import Notify, Workflow
from tests.seal_helpers import make_world, write_document
from tests.test_messaging_server import User, start_server, url


async def test_each_approver_gets_the_request_as_a_message(tmp_path: Path) -> None:
    world = make_world(tmp_path, members=("alice", "bob", "carol"))
    doc = tmp_path / "contract.txt"
    write_document(doc)
    alice_signer = world.signers["alice"]
    policy = Policy(Mode.THRESHOLD, 1, ("bob", "carol"))
    bundle = await seal_document(alice_signer, doc, world.sink, world.logs, policy=policy)
    server = await start_server(tmp_path)
    try:
        alice = await User(tmp_path / "m-alice", "alice", url(server)).start()
        bob = await User(tmp_path / "m-bob", "bob", url(server)).start()
        notifier = make_notifier(tmp_path / "wf", alice.client.send_text)
        assert isinstance(notifier, MessagingNotifier)
        workflow = Workflow(bundle.seal.statement, "alice", alice_signer.member.issuer_fingerprint)
        for notice in workflow.start():
            notifier.notify(notice, bundle, str(doc))
        failed = await notifier.flush()
        # carol has no messaging prekeys yet: reported, and her notice file is there.
        assert [r for r, _ in failed] == ["carol"] and "no prekeys" in failed[0][1]
        assert [n["what"] for n in notifier.inbox("carol")] == ["review"]
        assert [r for r, _ in notifier.sent] == ["bob"]
        events = await bob.client.receive()
        (message,) = [e for e in events if isinstance(e, MessageReceived)]
        wid = bundle.workflow_id[:16]
        assert message.sender == "alice"
        assert "approval is requested for 'contract.txt'" in message.content.text
        assert f"qcall seal approve {wid} --file {doc}" in message.content.text
        assert [n["workflow"] for n in notifier.inbox("bob")] == [bundle.workflow_id]
        # The sealer hears about a decision the same way.
        notifier.notify(Notify("alice", bundle.workflow_id, "approved", "by bob"), bundle, None)
        assert await notifier.flush() == []
        await alice.close()
        await bob.close()
    finally:
        await server.close()
