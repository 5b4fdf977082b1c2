"""The pure parts of scripts/load_cluster.py's routing measurement."""

from __future__ import annotations

import pytest

from scripts.load_cluster import schedule, spread


def test_kinds_take_turns_pair_by_pair_and_the_first_one_rotates() -> None:
    order = schedule(["same", "cross"], pairs=3, rounds=2)
    assert order == [
        (0, "same", 0), (0, "cross", 0), (0, "same", 1), (0, "cross", 1),
        (0, "same", 2), (0, "cross", 2),
        (1, "cross", 0), (1, "same", 0), (1, "cross", 1), (1, "same", 1),
        (1, "cross", 2), (1, "same", 2),
    ]  # fmt: skip
    three = schedule(["a", "b", "c"], pairs=1, rounds=3)
    assert [k for _, k, _ in three] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert schedule(["same"], pairs=2, rounds=2) == [
        (0, "same", 0), (0, "same", 1), (1, "same", 0), (1, "same", 1)
    ]  # fmt: skip


def test_spread_gives_the_ratio_of_medians_and_of_each_slice() -> None:
    same = [1.0] * 50 + [2.0] * 50  # the machine got slower halfway
    cross = [1.5] * 50 + [2.6] * 50
    got = spread(same, cross, blocks=2)
    assert got["samples_per_kind"] == 100
    assert got["ratio_blocks"] == [1.5, 1.3]
    assert got["cross_same_ratio_p50"] == pytest.approx(round(2.05 / 1.5, 2))
    assert got["same_p25_p50_p75_ms"] == [1.0, 2.0, 2.0]
    assert spread([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], blocks=5)["ratio_blocks"] == [2.0] * 3
