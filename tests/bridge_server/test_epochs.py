"""Lease epochs survive restarts: the store's high-water mark (bridge_server/tokens/epochs.py)."""

from __future__ import annotations

import json
from pathlib import Path

from bridge_server.tokens.epochs import BLOCK, EpochStore

WALL = 1_800_000_000.0


def test_first_epoch_after_a_restart_is_past_every_epoch_handed_out(tmp_path: Path) -> None:
    path = tmp_path / "epochs.json"
    store = EpochStore(path)
    first = store.first_epoch("codesign", WALL)
    handed_out = [first + i for i in range(3 * BLOCK)]  # crosses the persisted mark twice
    for epoch in handed_out:
        store.note_granted("codesign", epoch)
    restarted = EpochStore(path).first_epoch("codesign", WALL)  # same second: the clock did not help
    assert restarted > max(handed_out)


def test_marks_are_kept_per_token_and_written_as_json(tmp_path: Path) -> None:
    path = tmp_path / "epochs.json"
    store = EpochStore(path)
    a = store.first_epoch("a", WALL)
    store.first_epoch("b", WALL)
    store.note_granted("a", a + BLOCK + 5)
    marks = json.loads(path.read_text())["high_water"]
    assert marks["a"] > a + BLOCK + 5
    assert marks["b"] == int(WALL) + BLOCK


def test_a_later_wall_clock_still_wins_over_an_old_mark(tmp_path: Path) -> None:
    path = tmp_path / "epochs.json"
    EpochStore(path).first_epoch("codesign", WALL)
    assert EpochStore(path).first_epoch("codesign", WALL + 10 * BLOCK) == int(WALL) + 10 * BLOCK


def test_without_a_path_nothing_is_written(tmp_path: Path) -> None:
    store = EpochStore(None)
    first = store.first_epoch("codesign", WALL)
    store.note_granted("codesign", first + 2 * BLOCK)
    assert list(tmp_path.iterdir()) == []
