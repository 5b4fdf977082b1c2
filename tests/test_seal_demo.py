"""The seal part of ``qcall demo`` (qcall.seal.demo), on its own."""

from __future__ import annotations

from pathlib import Path

from qcall.seal.demo import run_seal_demo


async def test_seal_demo_report(tmp_path: Path) -> None:
    seal = await run_seal_demo(tmp_path)
    assert seal["verified"] is True and seal["inclusion_verified"] is True
    assert seal["log_size"] == 2 and seal["failures"] == []
    assert seal["workflow"] == "approved (1 of 1: bob)" and seal["approved_by"] == ["bob"]
    assert seal["sealed_by"] == "alice (Operations, engineer) of Hefei Municipal"
    assert seal["seconds"] < 10
    assert (tmp_path / "log" / "log.db").exists()
    assert (tmp_path / "authority" / "authority.key").stat().st_mode & 0o777 == 0o600


async def test_seal_demo_cleans_up_after_itself() -> None:
    assert (await run_seal_demo())["verified"]
