"""Multi-GPU training of one job (issue #9), tested on CPU: gloo, 2 processes launched through torchrun's launcher.

- 2 ranks train like 1 process on the same samples (same LoRA weights within float tolerance), including a stop
  that rank 0 decides, a checkpoint that rank 0 alone writes, and a resume of both ranks from it;
- a real ``flashtune worker --gpus 2`` trains a job: one adapter, progress and events from rank 0 only;
- a rank that fails fails the job with a message naming the rank, and no process of the attempt is left.

No multi-GPU machine was available: NCCL on CUDA is not exercised here (docs/operations.md).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from service.llm.builtin.data import generate
from tests.conftest import Service, builtin_spec, make_service
from workers.retry import Outcome
from workers.training import checkpoints, distributed
from workers.training.recipe import train
from workers.training.spec import Hooks, Interrupted, TrainingSpec

WEIGHT_TOLERANCE = 2e-5  # max |difference| of any LoRA weight, 2 ranks vs 1 process (float summation order)


ENV = {"FLASHTUNE_CHECKPOINT_EVERY_STEPS": "2"}


WAIT = 900  # seconds; a loaded 2-core machine is slow (no timing is asserted)


def _spec(tmp_path: Path, model: Path, name: str) -> TrainingSpec:
    """10 examples, 3 per step: 4 steps, the last with 1 sample (rank 1 then has none). No dropout: exact."""
    return builtin_spec(
        tmp_path, model, name=name, train=10, validation=0, checkpoint_every=100, batch_size=3, lora_dropout=0.0
    )


def _rank_train(spec: TrainingSpec, stop_after: int | None, run_dir: str, launcher_pid: int) -> None:
    """One rank (started by distributed.launch): train; rank 0 asks to stop after ``stop_after`` steps."""
    dist = distributed.init_rank("cpu", launcher_pid)
    seen = {"step": 0}

    def on_progress(progress: Any, force: bool) -> None:
        seen["step"] = progress.step

    hooks = Hooks(on_progress=on_progress, should_stop=lambda: stop_after is not None and seen["step"] >= stop_after)
    try:
        train(spec, distributed.rank_hooks(hooks, dist), dist)
        outcome = Outcome("succeeded")
    except Interrupted:
        outcome = Outcome("interrupted", progress={"step": seen["step"]})
    distributed.write_outcome(Path(run_dir), dist.rank, outcome)
    distributed.close_rank()


def _launch_two(tmp_path: Path, spec: TrainingSpec, stop_after: int | None) -> Outcome:
    run_dir = tmp_path / f"run-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir()
    return distributed.launch(_rank_train, (spec, stop_after, str(run_dir), os.getpid()), 2, run_dir, run_dir.name)


@pytest.mark.slow
def test_two_ranks_train_like_one_process_and_resume(tmp_path: Path, builtin_model_cache: Path) -> None:
    single = train(_spec(tmp_path, builtin_model_cache, "single"), Hooks())
    spec = _spec(tmp_path, builtin_model_cache, "ranks")
    stopped = _launch_two(tmp_path, spec, stop_after=2)
    assert stopped.status == "interrupted", stopped
    assert [p.name for p in checkpoints.complete(spec.job_dir)] == ["step-00000002"]  # written once, by rank 0
    resumed = _launch_two(tmp_path, spec, stop_after=None)
    assert resumed.status == "succeeded", resumed

    info = json.loads((spec.adapter_dir / "training_info.json").read_text())
    assert info["resumed_from_step"] == 2 and info["total_steps"] == single["total_steps"] == 4
    steps = [s for s, _ in info["losses"]["step_loss"]]
    assert steps == [s for s, _ in single["losses"]["step_loss"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(single["losses"]["step_loss"], info["losses"]["step_loss"], strict=True):
        assert a == pytest.approx(b, rel=1e-3)  # the loss over all ranks' samples, not rank 0's half
    a = load_file(str(tmp_path / "adapters" / "single" / "adapter_model.safetensors"))
    b = load_file(str(spec.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)
    assert worst <= WEIGHT_TOLERANCE < moved, (worst, moved)
    print(
        f"\n2 ranks (stopped at 2, resumed) vs 1 process: max |weight difference| {worst:.2e} "
        f"(tolerance {WEIGHT_TOLERANCE}); bitwise equal: {all(torch.equal(a[k], b[k]) for k in a)}"
    )


def _upload(svc: Service, count: int) -> str:
    lines = [
        json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output}, ensure_ascii=False)
        for e in generate(count, 7)
    ]
    response = svc.client.post("/datasets", files={"file": ("small.jsonl", "\n".join(lines).encode(), "text/plain")})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


def _attempt_processes(svc: Service) -> list[str]:
    """Processes of this service other than the API and the workers (and a worker's multiprocessing helpers: its
    resource tracker and its fork server; a training process forked from the server has the server as parent)."""
    mine = f"FLASHTUNE_DATA_DIR={svc.data_dir}".encode()
    keep = {p.pid for p in [*svc.workers, *([svc.api] if svc.api else [])]}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mine not in (proc / "environ").read_bytes().split(b"\0") or int(proc.name) in keep:
                continue
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if stat[0] == "Z" or (int(stat[1]) in keep and ("resource_tracker" in cmdline or "forkserver" in cmdline)):
            continue
        found.append(f"{proc.name} (parent {stat[1]}): {cmdline[:120]}")
    return found


def _no_attempt_processes(svc: Service, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (left := _attempt_processes(svc)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left


@pytest.fixture
def svc(tmp_path: Path, builtin_model_cache: Path, request: pytest.FixtureRequest) -> Iterator[Service]:
    service = make_service(tmp_path, builtin_model_cache, workers=0, env={**ENV, **getattr(request, "param", {})})
    service.start_worker("--gpus", "2")
    yield service
    service.stop()


@pytest.mark.slow
@pytest.mark.parametrize("svc", [{"FLASHTUNE_LOG_JSON": "true"}], indirect=True)
def test_worker_gpus_2_trains_one_job(svc: Service) -> None:
    job = svc.post_job(dataset=_upload(svc, 20), hyperparameters={"epochs": 1, "validation_fraction": 0.0})
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        job = svc.job(job["id"])
        if job["status"] == "running" and job["progress"]["step"]:
            seen.append(job["progress"])
        time.sleep(0.2)
    assert job["status"] == "succeeded", (job, svc.logs())
    assert job["attempts"] == 1 and job["progress"]["step"] == job["progress"]["total_steps"] == 5  # 20 / 4
    assert seen and all(p["total_steps"] == 5 and p["tokens_per_second"] for p in seen), seen

    adapters = [p.name for p in (svc.data_dir / "adapters").iterdir()]
    assert adapters == [job["adapter"]], adapters  # one adapter, no leftover of a second writer
    info = json.loads((svc.data_dir / "adapters" / job["adapter"] / "training_info.json").read_text())
    assert info["distributed"] == {"world_size": 2, "backend": "gloo"} and info["total_steps"] == 5

    evs = svc.client.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    types = [e["type"] for e in evs]
    assert types.count("setup") == 1 and types.count("succeeded") == 1, types  # rank 0 alone reports
    assert [e["data"]["step"] for e in evs if e["type"] == "checkpoint"] == [2, 4, 5], types  # rank 0 alone writes
    assert next(e for e in evs if e["type"] == "distributed")["data"]["world_size"] == 2
    _no_attempt_processes(svc)
    lines = (svc.data_dir / "worker-0.log").read_text().splitlines()
    logged = [json.loads(line) for line in lines if line.strip()]  # the launcher's and both ranks' lines too
    assert any(e.get("job_id") == job["id"] for e in logged), lines


@pytest.mark.slow
@pytest.mark.parametrize("svc", [{"FLASHTUNE_FAULTS": "workers.testing:RANK_1_FAILS_AFTER_STEP_2"}], indirect=True)
def test_rank_failure_fails_the_job_and_leaves_no_process(svc: Service) -> None:
    job = svc.post_job(dataset=_upload(svc, 20), hyperparameters={"epochs": 1, "validation_fraction": 0.0})
    job = svc.wait(job["id"], timeout=WAIT)
    assert job["status"] == "failed", (job, svc.logs())
    message = job["error"]["message"]
    assert message.startswith("rank 1 of 2 failed: RuntimeError: injected by"), (message, svc.logs())
    assert job["attempts"] == 1 and job["error"]["type"] == "training_error"  # final, as in one process
    assert not (svc.data_dir / "adapters").exists() or not list((svc.data_dir / "adapters").iterdir())
    _no_attempt_processes(svc)
    assert svc.workers[0].poll() is None  # the worker goes on to the next job


def _wait_running_past(svc: Service, job_id: int, step: int, event: str = "") -> None:
    """Until the job is running at ``step`` or later (and, if given, has an ``event`` event at or past it)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        job = svc.job(job_id)
        assert job["status"] in ("queued", "running"), (job, svc.logs())
        evs = svc.client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        if (
            job["status"] == "running"
            and (job["progress"]["step"] or 0) >= step
            and (not event or any(e["type"] == event and e["data"]["step"] >= step for e in evs))
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never ran past step {step}\n{svc.logs()}")


LONGER = {"epochs": 12, "validation_fraction": 0.0}


LONGER_STEPS = 60


@pytest.mark.slow
def test_cancel_stops_every_rank(svc: Service) -> None:
    job = svc.post_job(dataset=_upload(svc, 20), hyperparameters=LONGER)
    _wait_running_past(svc, job["id"], 1)
    assert svc.client.post(f"/jobs/{job['id']}/cancel").status_code == 200
    _no_attempt_processes(svc)  # the worker killed the launcher's process group: both ranks
    assert svc.job(job["id"])["status"] == "cancelled" and svc.workers[0].poll() is None
    assert not (svc.data_dir / "adapters").exists() or not list((svc.data_dir / "adapters").iterdir())


@pytest.mark.slow
def test_sigterm_checkpoints_and_two_ranks_resume(svc: Service) -> None:
    import signal

    job = svc.post_job(dataset=_upload(svc, 20), hyperparameters=LONGER)
    _wait_running_past(svc, job["id"], 2, event="checkpoint")
    svc.workers[0].send_signal(signal.SIGTERM)  # torchrun passes it to the ranks; rank 0 checkpoints, all stop
    assert svc.workers[0].wait(120) == 0
    _no_attempt_processes(svc)
    stopped = svc.job(job["id"])
    assert stopped["status"] == "queued" and stopped["error"]["type"] == "interrupted", stopped
    at = stopped["progress"]["step"]
    assert [p.name for p in checkpoints.complete(svc.data_dir / "jobs" / str(job["id"]))][-1] == f"step-{at:08d}"

    svc.start_worker("--gpus", "2")
    done = svc.wait(job["id"], timeout=WAIT)
    assert done["status"] == "succeeded" and done["attempts"] == 2, (done, svc.logs())
    info = json.loads((svc.data_dir / "adapters" / done["adapter"] / "training_info.json").read_text())
    steps = [s for s, _ in info["losses"]["step_loss"]]
    assert info["resumed_from_step"] == at and steps == list(range(1, LONGER_STEPS + 1))
