"""Resume equivalence, in process: a run stopped at step 5 (after a checkpoint at 4) and resumed ends with the
same weights and the same step order as an uninterrupted run (the real-process crash tests are in
tests/integration/test_reliability.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import builtin_spec
from workers.training.recipe import train
from workers.training.spec import Hooks, Interrupted, TrainingSpec

pytestmark = pytest.mark.slow


RESUME_TOLERANCE = 1e-5  # max |difference| of any adapter weight between an uninterrupted and a resumed run


def _spec(tmp_path: Path, model: Path, name: str) -> TrainingSpec:
    return builtin_spec(tmp_path, model, name=name, train=24, validation=3, epochs=2, lora_dropout=0.0)


def test_resume_equivalence(tmp_path: Path, builtin_model_cache: Path) -> None:
    """Uninterrupted vs stopped at step 5 (mid-epoch, after a checkpoint at 4) and resumed: same end, same weights."""
    straight = train(_spec(tmp_path, builtin_model_cache, "straight"), Hooks())
    spec = _spec(tmp_path, builtin_model_cache, "resumed")
    stop = {"now": False}

    def on_progress(progress: Any, force: bool) -> None:
        stop["now"] = progress.step >= 5

    with pytest.raises(Interrupted):
        train(spec, Hooks(on_progress=on_progress, should_stop=lambda: stop["now"]))
    resumed = train(spec, Hooks())
    assert resumed["resumed_from_step"] == 5 and resumed["total_steps"] == straight["total_steps"] == 12
    a = load_file(str(tmp_path / "adapters" / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "adapters" / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= RESUME_TOLERANCE, worst
    assert [s for s, _ in straight["losses"]["step_loss"]] == [s for s, _ in resumed["losses"]["step_loss"]]
    print(
        f"\nresume equivalence: max |weight difference| {worst:.2e} over {sum(t.numel() for t in a.values())} "
        f"weights (tolerance {RESUME_TOLERANCE}); bitwise equal: {all(torch.equal(a[k], b[k]) for k in a)}"
    )
