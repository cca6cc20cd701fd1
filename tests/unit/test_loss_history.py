"""The step log behind GET /jobs/{id}/metrics: one line per step, resumed attempts replacing what they retrain."""

from __future__ import annotations

from pathlib import Path

from service.jobs.loss_history import STEPS_FILE, StepLog, read_steps, thin


def test_step_log_keeps_the_last_attempt_of_each_step(tmp_path: Path) -> None:
    first = StepLog(tmp_path)
    for step in range(1, 8):
        first.append({"step": step, "loss": 1.0 / step, "epoch": step / 10})
    first.append({"step": 7, "loss": 9.9})  # the loop reports the step it stops at twice: written once
    first.append({"step": 0, "loss": 5.0})  # no step yet: nothing to draw
    # A requeued job resumes from its checkpoint at step 5 and trains steps 6.. again, with other losses.
    second = StepLog(tmp_path)
    for step in range(6, 10):
        second.append({"step": step, "loss": 2.0})
    with (tmp_path / STEPS_FILE).open("a") as out:
        out.write('{"step": 10, "loss"')  # a line being written as the API reads
    points = read_steps(tmp_path / STEPS_FILE)
    assert [s for s, _ in points] == list(range(1, 10))
    assert points[4] == (5, 0.2) and all(loss == 2.0 for s, loss in points if s >= 6)


def test_missing_file_and_thinning(tmp_path: Path) -> None:
    assert read_steps(tmp_path / "nothing.jsonl") == []
    points = [(i, float(i)) for i in range(1, 1001)]
    thinned = thin(points, 100)
    assert len(thinned) == 100 and thinned[0] == (1, 1.0) and thinned[-1] == (1000, 1000.0)
    assert thinned == sorted(thinned) and thin(points[:50], 100) == points[:50]


def test_a_damaged_training_record_reads_as_empty(tmp_path: Path) -> None:
    """One reader for training_info.json (adapters route, loss history, model server): missing, unparseable or not
    an object all read as {}, so an adapter with a damaged record still lists and serves."""
    from service.core.training_info import FILENAME, read_training_info

    assert read_training_info(tmp_path) == {}
    for damaged in ("{not json", "[1, 2]", "\udcff"):
        (tmp_path / FILENAME).write_text(damaged, encoding="utf-8", errors="surrogateescape")
        assert read_training_info(tmp_path) == {}
    (tmp_path / FILENAME).write_text('{"input_fields": ["star"]}', encoding="utf-8")
    assert read_training_info(tmp_path) == {"input_fields": ["star"]}
