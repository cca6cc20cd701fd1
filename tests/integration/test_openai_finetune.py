"""The official openai client creates, follows and cancels FlashTune jobs through /v1/files and /v1/fine_tuning."""

from __future__ import annotations

import io
import json
import time

import pytest

from service.llm.builtin.data import builtin_dataset
from tests.conftest import Service

pytestmark = pytest.mark.slow


def _chat_jsonl(count: int) -> bytes:
    rows = []
    for e in builtin_dataset()[0][:count]:
        messages = [
            {"role": "system", "content": e.instruction},
            {"role": "user", "content": e.input},
            {"role": "assistant", "content": e.output},
        ]
        rows.append(json.dumps({"messages": messages}, ensure_ascii=False))
    return "\n".join(rows).encode()


def test_openai_client_drives_a_fine_tuning_job(service: Service) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{service.url}/v1", api_key="unused")
    uploaded = client.files.create(file=("train.jsonl", io.BytesIO(_chat_jsonl(40))), purpose="fine-tune")
    assert uploaded.id.startswith("ds-") and uploaded.purpose == "fine-tune"

    job = client.fine_tuning.jobs.create(
        model="builtin", training_file=uploaded.id, hyperparameters={"n_epochs": 1, "batch_size": 4}, suffix="demo"
    )
    assert job.id.startswith("ftjob-") and job.status == "queued" and job.hyperparameters.n_epochs == 1
    deadline = time.monotonic() + 300
    while job.status in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", service.logs()
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("job-")

    messages = [event.message for event in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any("succeeded" in m for m in messages) and any("queued" in m for m in messages)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert checkpoints.data[0].fine_tuned_model_checkpoint == job.fine_tuned_model
    assert [j.id for j in client.fine_tuning.jobs.list(limit=10)] == [job.id]

    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "美联储宣布加息25个基点"}], max_tokens=40
    )
    assert reply.choices[0].message.content

    second = client.fine_tuning.jobs.create(model="builtin", training_file=uploaded.id)
    cancelled = client.fine_tuning.jobs.cancel(second.id)
    assert cancelled.status == "cancelled"


def test_bad_fine_tuning_requests(service: Service) -> None:
    bad = service.client.post("/v1/fine_tuning/jobs", json={"model": "builtin", "training_file": "ds-missing"})
    assert bad.status_code == 422 and "training_file" in bad.text
    bad = service.client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "builtin", "training_file": "builtin", "hyperparameters": {"n_epochs": "many"}},
    )
    assert bad.status_code == 422 and "n_epochs" in bad.text
    assert service.client.get("/v1/fine_tuning/jobs/ftjob-999").status_code == 404
