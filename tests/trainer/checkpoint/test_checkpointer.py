"""The Checkpointer's schedule: every / final / best / force, never twice for one step."""

from pathlib import Path

import pytest

from trainer.checkpoint import Checkpointer, checkpointer
from trainer.config import load_config
from trainer.state import TrainState


class _Metrics:
    def __init__(self):
        self.saved = []

    def checkpoint_saved(self, seconds, step):
        self.saved.append(step)


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """A Checkpointer (every 4 of 10 steps, 3 batches per epoch) whose saves and `best`
    pointer moves are recorded instead of written."""
    saves, bests = [], []

    def fake_save(root, parts, state, *, keep, inject_kill, run_id):
        saves.append((state.step, state.epoch, state.batch_in_epoch, keep, inject_kill, run_id))
        return Path(root) / f"step-{state.step:09d}"

    monkeypatch.setattr(checkpointer, "save", fake_save)
    monkeypatch.setattr(checkpointer, "mark_best", lambda root, ckpt: bests.append(ckpt.name))
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "checkpoint.every=4", "checkpoint.keep=2",
                             "checkpoint.inject_kill_during_save=8"])
    metrics = _Metrics()
    return Checkpointer(cfg, None, 3, 10, metrics, run_id="r1"), saves, bests, metrics


def test_schedule_every_final_best_force_and_no_double_save(recorded):
    ckpt, saves, bests, metrics = recorded
    written = {}
    for step in range(1, 11):
        state = TrainState(step=step, epoch=(step - 1) // 3, batch_in_epoch=(step - 1) % 3 + 1)
        written[step] = ckpt.maybe_save(state, best=step == 6, force=step == 9)
    assert [s[0] for s in saves] == [4, 6, 8, 9, 10]  # every 4, best at 6, forced 9, final 10
    assert {s for s, path in written.items() if path is not None} == {4, 6, 8, 9, 10}
    assert written[6].name == "step-000000006" and bests == ["step-000000006"]
    assert all(keep == 2 and run_id == "r1" for *_, keep, _, run_id in saves)
    assert [s[0] for s in saves if s[4]] == [8]  # fault injection at its step only
    assert saves[2][:3] == (8, 2, 2)
    assert saves[3][:3] == (9, 3, 0)  # an exhausted epoch is saved as the next one's start
    assert metrics.saved == [4, 6, 8, 9, 10]
    final = TrainState(step=10)
    assert ckpt.finish(final) is None and ckpt.maybe_save(final, force=True) is None
    assert ckpt.maybe_save(final, best=True) is None and bests[-1] == "step-000000010"
    assert len(saves) == 5  # nothing saved twice


def test_finish_saves_a_step_not_yet_saved(recorded):
    ckpt, saves, _, _ = recorded
    assert ckpt.maybe_save(TrainState(step=3)) is None and not saves  # not due
    assert ckpt.finish(TrainState(step=3)).name == "step-000000003"
    assert [s[0] for s in saves] == [3]
