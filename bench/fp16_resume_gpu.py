"""fp16 resume on a GPU (issue 21): a job on the fp16 plan (dynamic loss scaling, ``torch.amp.GradScaler``) that is
stopped after a checkpoint and resumed goes on with the loss scale it had reached, instead of starting again from the
initial scale and skipping steps again to get back there.

Three runs of the same job in one process, through the real ``workers.training.recipe.train`` on the fp16 plan
(``compute_dtype="float16"``), a tiny Llama and the built-in examples:

  straight     uninterrupted
  resumed      stopped right after the straight run's last skipped step (a checkpoint there), then resumed
  resumed_old  the same, its checkpoints restored without the scaler's state, as before the fix: the baseline

The scaler starts at 2**32 here (torch's default is 2**16) so that the first steps overflow on any model: the straight
run's skipped steps are the figure a resume must not add to. Expected: ``resumed`` skips as many steps as
``straight`` and ends with the same loss scale; ``resumed_old`` skips about twice as many (the scale falls from 2**32
again) and its steps after the stop differ.

On the GPU machine (about a minute; writes OUT/fp16_resume.json and prints it):
  export PYTHONPATH=$PWD/.devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  python3 bench/fp16_resume_gpu.py "$OUT"
On the CPU (``--tiny``: no GradScaler there, so this only checks that the three runs go through):
  python bench/fp16_resume_gpu.py /tmp/fp16-resume --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.job_api_gpu import build  # noqa: E402
from service.jobs.hyperparameters import Hyperparameters, resolve  # noqa: E402
from service.jobs.models import Progress  # noqa: E402
from service.llm.builtin.data import builtin_dataset  # noqa: E402
from workers.training import checkpoints  # noqa: E402
from workers.training.recipe import train  # noqa: E402
from workers.training.spec import Hooks, Interrupted, TrainingSpec  # noqa: E402

INIT_SCALE = 2.0**32  # far above what fp16 holds: the first steps overflow on any model


def spec(root: Path, model: Path, name: str, device: str) -> TrainingSpec:
    train_set, held_out = builtin_dataset()
    hp = Hyperparameters(epochs=2, batch_size=4, lora_dropout=0.0, max_length=256, validation_fraction=0.0)
    return TrainingSpec(
        job_id=1,
        base_model="tiny-llama",
        base_source=str(model),
        dataset="builtin",
        dataset_sha256=None,
        train=train_set[:96],  # 24 steps per epoch, 48 in all
        validation=held_out[:16],
        hp=resolve(hp, "tiny-llama"),
        job_dir=root / "jobs" / name,
        adapter_dir=root / "adapters" / name,
        device=device,
        checkpoint_every=1000,  # checkpoints at epoch ends and where the run is stopped
        compute_dtype="float16",
    )


def run(root: Path, model: Path, name: str, device: str, stop_at: int | None, scaler_state: bool) -> dict[str, Any]:
    """One job: uninterrupted (``stop_at`` None), or stopped after step ``stop_at`` and resumed (``scaler_state``
    False: the checkpoint restored without the scaler's state)."""
    the_spec = spec(root, model, name, device)
    shutil.rmtree(the_spec.job_dir, ignore_errors=True)
    skipped: list[tuple[int, float]] = []
    resumed_from: list[int] = []

    def on_event(kind: str, message: str, data: dict[str, Any] | None) -> None:
        if kind == "skipped_step" and data:
            skipped.append((int(data["step"]), float(data["loss_scale"])))
        if kind == "resumed" and data:
            resumed_from.append(int(data["step"]))

    started = time.perf_counter()
    if stop_at is not None:
        stop = {"now": False}

        def on_progress(progress: Progress, force: bool) -> None:
            stop["now"] = progress.step >= stop_at

        with contextlib.suppress(Interrupted):  # checkpointed at stop_at
            train(the_spec, Hooks(on_progress=on_progress, on_event=on_event, should_stop=lambda: stop["now"]))
    restore = checkpoints.restore
    if not scaler_state:  # as before the fix: the optimizer, scheduler and RNG come back, the loss scale does not
        checkpoints.restore = lambda job_dir, model, optimizer, scheduler, history, scaler=None: restore(  # type: ignore[assignment]
            job_dir, model, optimizer, scheduler, history
        )
    try:
        info = train(the_spec, Hooks(on_event=on_event))
    finally:
        checkpoints.restore = restore  # type: ignore[assignment]
    from safetensors.torch import load_file

    weights = load_file(str(the_spec.adapter_dir / "adapter_model.safetensors"))
    return {
        "run": name,
        "stopped_at": stop_at,
        "resumed_from": resumed_from,
        "skipped": skipped,  # (step, loss scale after it), every attempt
        "skipped_steps": len(skipped),
        "skipped_steps_recorded": info.get("skipped_steps"),  # training_info.json's, every attempt
        "loss_scale": info.get("loss_scale"),
        "compute_dtype": info.get("compute_dtype"),
        "total_steps": info["total_steps"],
        "step_loss": info["losses"]["step_loss"],
        "adapter_finite": all(bool(torch.isfinite(t).all()) for t in weights.values()),
        "seconds": round(time.perf_counter() - started, 1),
        "_weights": weights,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="on the CPU: no loss scaling, the runs go through")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    root = Path(tempfile.mkdtemp(prefix="fp16-resume-"))
    model = root / "tiny-llama"
    build(model, tiny=True)
    torch.amp.GradScaler = functools.partial(torch.amp.GradScaler, init_scale=INIT_SCALE)  # type: ignore[misc,assignment]
    straight = run(root, model, "straight", device, None, True)
    last_skipped = max((step for step, _ in straight["skipped"]), default=2)
    stop_at = min(last_skipped + 3, straight["total_steps"] - 2)  # after the scale has settled, mid-epoch
    resumed = run(root, model, "resumed", device, stop_at, True)
    old = run(root, model, "resumed_old", device, stop_at, False)
    base = straight.pop("_weights")
    for result in (resumed, old):
        weights = result.pop("_weights")
        result["max_weight_diff_vs_straight"] = max(float((weights[k] - base[k]).abs().max()) for k in base)
        pairs = zip(result["step_loss"], straight["step_loss"], strict=True)
        result["max_step_loss_diff_vs_straight"] = max(abs(a[1] - b[1]) for a, b in pairs)
    summary = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "init_scale": INIT_SCALE,
        "stop_at": stop_at,
        "straight": straight,
        "resumed": resumed,
        "resumed_old": old,
        "checks": {
            "resumed_skips_no_more_than_straight": resumed["skipped_steps"] == straight["skipped_steps"],
            "resumed_same_final_scale": resumed["loss_scale"] == straight["loss_scale"],
            "old_skips_more": old["skipped_steps"] > straight["skipped_steps"] if device == "cuda" else None,
            "finite": all(r["adapter_finite"] for r in (straight, resumed, old)),
            "no_nan_loss": all(math.isfinite(v) for r in (straight, resumed, old) for _, v in r["step_loss"]),
        },
    }
    for r in (straight, resumed, old):
        r["step_loss"] = r["step_loss"][-3:]  # the last steps are enough in the file
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    (args.out / "fp16_resume.json").write_text(text)
    print(text)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
