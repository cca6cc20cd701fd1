"""The official ``openai`` client, unchanged, against a real ``flashtune serve`` and ``flashtune worker``: every call
it makes works or is refused with a status that names the parameter (files, fine-tuning jobs and their events with
auto-pagination to the end, models, chat completions with sampling, stop strings, logprobs and n), guided choices
agree with /analyze, the whole chat prompt is bounded, and a client that goes away stops the generation."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.llm.builtin.data import builtin_dataset
from service.llm.prompts import LABEL_WORDS
from tests.conftest import Service, seed_builtin, wait_for

pytestmark = pytest.mark.slow
NEWS = ["美联储宣布加息25个基点", "欧洲央行宣布降息50个基点", "日本央行维持利率不变"]


def _chat_jsonl(start: int, count: int) -> bytes:
    rows = []
    train, held_out = builtin_dataset()
    for e in (train + held_out)[start : start + count]:
        messages = [
            {"role": "system", "content": e.instruction},
            {"role": "user", "content": e.input},
            {"role": "assistant", "content": e.output},
        ]
        rows.append(json.dumps({"messages": messages}, ensure_ascii=False))
    return "\n".join(rows).encode()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path) -> Iterator[Service]:
    """An API (logging at info, to see stopped generations) and a worker."""
    data_dir = tmp_path_factory.mktemp("openai-sdk")
    seed_builtin(data_dir, builtin_model_cache)
    service = Service(data_dir)
    service.start_api(log_level="info")
    service.start_worker()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def client(served: Service) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def trained(served: Service, client: Any) -> dict[str, Any]:
    """One job through the client: a training file, a validation file, method.supervised hyperparameters, a
    suffix; waited for until it succeeded."""
    train = _chat_jsonl(0, 24)
    validation = _chat_jsonl(240, 8)
    train_file = client.files.create(file=("train.jsonl", io.BytesIO(train)), purpose="fine-tune")
    validation_file = client.files.create(file=("valid.jsonl", io.BytesIO(validation)), purpose="fine-tune")
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}
    job = client.fine_tuning.jobs.create(
        model="builtin",
        training_file=train_file.id,
        validation_file=validation_file.id,
        method=method,
        suffix="sdk",
        seed=3,
    )
    assert job.status == "queued" and job.hyperparameters.n_epochs == 1 and job.validation_file == validation_file.id
    deadline = time.monotonic() + 600
    while job.status in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", served.logs()
    return {"job": job, "train": (train_file, train), "validation": (validation_file, validation)}


# ------------------------------------------------------------------------------------------------------ files
def test_files_list_retrieve_content_and_delete(served: Service, client: Any, trained: dict[str, Any]) -> None:
    from openai import BadRequestError, ConflictError, NotFoundError

    (train_file, train), (validation_file, validation) = trained["train"], trained["validation"]
    assert client.files.retrieve(train_file.id).bytes == len(train) == train_file.bytes
    assert client.files.content(validation_file.id).read() == validation
    everything = [f.id for f in client.files.list(limit=1)]  # auto-pagination, one file a page, to the end
    assert everything == [validation_file.id, train_file.id]
    assert [f.id for f in client.files.list(limit=1, order="asc")] == [train_file.id, validation_file.id]
    with pytest.raises(BadRequestError, match="purpose"):
        client.files.list(purpose="batch")

    extra = client.files.create(file=("extra.jsonl", io.BytesIO(_chat_jsonl(100, 12))), purpose="fine-tune")
    queued = client.fine_tuning.jobs.create(model="builtin", training_file=extra.id)
    with pytest.raises(ConflictError, match="cancel"):  # a queued or running job trains on it
        client.files.delete(extra.id)
    client.fine_tuning.jobs.cancel(queued.id)
    deleted = client.files.delete(extra.id)
    assert deleted.deleted and deleted.id == extra.id
    with pytest.raises(NotFoundError):
        client.files.retrieve(extra.id)
    assert extra.id not in [f.id for f in client.files.list()]


# ------------------------------------------------------------------------------------------- fine-tuning jobs
def test_the_job_honours_method_validation_file_and_suffix(served: Service, client: Any, trained: dict) -> None:
    job = trained["job"]
    assert job.fine_tuned_model == f"job-{job.id.removeprefix('ftjob-')}:sdk" and job.user_provided_suffix == "sdk"
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 1
    assert job.trained_tokens and job.trained_tokens > 24 * 20  # every example's tokens went through once
    adapter = served.client.get(f"/adapters/{job.fine_tuned_model.split(':')[0]}").json()
    assert adapter["metrics"]["num_labelled"] == 8  # the validation file, not a share of the training file
    assert len(adapter["metrics"]["losses"]["step_loss"]) == 6  # 24 examples, batch 4, 1 epoch

    [results] = job.result_files
    assert client.files.retrieve(results).purpose == "fine-tune-results"
    csv = client.files.content(results).text.splitlines()
    assert csv[0] == "step,train_loss,valid_loss" and len(csv) == 1 + 6 and csv[-1].count(",") == 2
    assert csv[-1].split(",")[2]  # the epoch's end carries the validation loss

    assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model
    assert client.models.retrieve("builtin").id == "builtin"
    assert job.fine_tuned_model in [m.id for m in client.models.list()]


def test_events_and_jobs_auto_paginate_to_the_end(client: Any, trained: dict[str, Any]) -> None:
    job = trained["job"]
    whole = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    paged = list(client.fine_tuning.jobs.list_events(job.id, limit=3))  # the client follows `after` to the end
    assert [e.id for e in paged] == [e.id for e in whole] and len({e.id for e in paged}) == len(paged) > 3
    assert any("succeeded" in e.message for e in paged[:3]) and "queued" in paged[-1].message  # newest first
    jobs = list(client.fine_tuning.jobs.list(limit=1))
    assert len(jobs) == len({j.id for j in jobs}) >= 1 and jobs[-1].id == job.id  # newest first, ending at the first


def test_unsupported_fine_tuning_requests_are_refused_by_name(client: Any, trained: dict[str, Any]) -> None:
    from openai import BadRequestError, NotFoundError, UnprocessableEntityError

    train_file = trained["train"][0]
    refused: dict[str, dict[str, Any]] = {
        "method.type": {"method": {"type": "dpo", "dpo": {}}},
        "integrations": {"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]},
        "hyperparameters": {"hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised", "supervised": {}}},
    }
    for field, extra in refused.items():
        with pytest.raises(BadRequestError) as error:
            client.fine_tuning.jobs.create(model="builtin", training_file=train_file.id, **extra)
        assert error.value.body["details"] == [{"field": field}]  # type: ignore[index]
    with pytest.raises(BadRequestError, match="flavour"):
        client.fine_tuning.jobs.create(model="builtin", training_file=train_file.id, extra_body={"flavour": 1})
    with pytest.raises(UnprocessableEntityError, match="validation_file"):
        client.fine_tuning.jobs.create(model="builtin", training_file=train_file.id, validation_file="ds-missing")
    with pytest.raises(UnprocessableEntityError, match="training_file"):
        client.fine_tuning.jobs.create(model="builtin", training_file="ds-missing")
    with pytest.raises(UnprocessableEntityError, match="n_epochs"):
        client.fine_tuning.jobs.create(model="builtin", training_file="builtin", hyperparameters={"n_epochs": "many"})
    with pytest.raises(NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-999")
    with pytest.raises(NotFoundError):
        client.models.retrieve("job-999")
    with pytest.raises(UnprocessableEntityError, match="after"):
        client.fine_tuning.jobs.list_events(trained["job"].id, after="not-an-event")


# ------------------------------------------------------------------------------------------------------ chat
def _ask(client: Any, model: str, text: str = NEWS[0], **options: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **options)


def test_guided_choice_agrees_with_analyze(served: Service, client: Any, trained: dict[str, Any]) -> None:
    model = trained["job"].fine_tuned_model
    for text in NEWS:
        body = {"text": text, "adapter": model.split(":")[0], "max_new_tokens": 0}
        analyzed = served.client.post("/analyze", json=body).json()
        words = [LABEL_WORDS[label] for label in ("bullish", "bearish", "neutral")]
        choice = _ask(client, model, text, extra_body={"guided_choice": words}).choices[0].message.content
        assert choice == LABEL_WORDS[analyzed["label"]], (text, analyzed["probs"])


def test_sampling_stop_logprobs_and_n(client: Any, trained: dict[str, Any]) -> None:
    model = trained["job"].fine_tuned_model
    plain = _ask(client, model).choices[0].message.content
    stopped = _ask(client, model, stop=["。"], temperature=0).choices[0]
    assert stopped.message.content == plain.split("。")[0] and stopped.finish_reason == "stop"

    seeded: dict[str, Any] = {"temperature": 1.2, "top_p": 0.95, "seed": 11, "max_completion_tokens": 40}
    first, again = _ask(client, model, **seeded), _ask(client, model, **seeded)
    assert first.choices[0].message.content == again.choices[0].message.content  # the seed repeats the draw

    with_logprobs = _ask(client, model, logprobs=True, top_logprobs=2, max_tokens=12)
    tokens = with_logprobs.choices[0].logprobs.content
    assert 0 < len(tokens) <= with_logprobs.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    spelled = b"".join(bytes(t.bytes) for t in tokens).decode(errors="replace")
    assert with_logprobs.choices[0].message.content in spelled

    two = _ask(client, model, n=2, temperature=1.0, seed=5, max_tokens=30)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens > 0
    cut = _ask(client, model, max_completion_tokens=3, temperature=0.5, seed=1)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3

    stream = _ask(client, model, n=2, temperature=1.0, seed=5, max_tokens=30, stream=True, logprobs=True)
    texts: dict[int, str] = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in two.choices]  # the same draws, streamed


def test_unsupported_chat_parameters_are_refused_by_name(client: Any) -> None:
    from openai import BadRequestError, UnprocessableEntityError

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused: list[tuple[dict[str, Any], str]] = [
        ({"tools": [tool]}, "tools"),
        ({"extra_body": {"guided_choice": ["利好", "利空"]}, "temperature": 0.7}, "temperature"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ]
    for options, field in refused:
        with pytest.raises(BadRequestError, match=field):
            _ask(client, "builtin", **options)
    with pytest.raises(UnprocessableEntityError, match="max_tokens"):
        _ask(client, "builtin", max_tokens=100_000)


def test_the_whole_prompt_is_bounded(client: Any) -> None:
    from openai import UnprocessableEntityError

    def refused(messages: list[dict[str, str]], **options: Any) -> list[dict[str, str]]:
        with pytest.raises(UnprocessableEntityError) as error:
            client.chat.completions.create(model="builtin", messages=messages, **options)
        return error.value.body["details"]  # type: ignore[no-any-return,index]

    user = {"role": "user", "content": NEWS[0]}
    started = time.monotonic()
    assert refused([{"role": "system", "content": "分析" * 32_000}, user]) == [{"field": "messages[0].content"}]
    many = [{"role": "assistant", "content": "x" * 3000}] * 6
    assert refused([*many, user]) == [{"field": "messages"}]
    assert refused([user], extra_body={"guided_choice": ["利好", "很长" * 200]}) == [{"field": "guided_choice[1]"}]
    assert time.monotonic() - started < 30  # refused before the model runs
    # within the characters, over the tokens: the model's context (512) less max_tokens leaves it no room
    assert refused([{"role": "system", "content": "请分析" * 1000}, user]) == [{"field": "messages[0].content"}]


def test_a_client_that_goes_away_stops_the_generation(served: Service) -> None:
    body = {
        "model": "builtin",
        "messages": [{"role": "user", "content": NEWS[1]}],
        "temperature": 2.0,
        "max_tokens": 256,
        "seed": 1,
    }
    impatient = httpx.Client(base_url=served.url, timeout=httpx.Timeout(60, read=0.05))  # gone before the first poll
    with impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/chat/completions", json=body)
    wait_for(lambda: "the client went away" in _api_log(served), 60, "the plain request's generation to stop", served)
    lines = [line for line in _api_log(served).splitlines() if "the client went away" in line]
    assert "max_tokens 256" in lines[0] and "after 256 " not in lines[0]

    streaming = httpx.Client(base_url=served.url, timeout=60)
    with streaming, streaming.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first chunk, then the client leaves
    wait_for(lambda: _api_log(served).count("the client went away") >= 2, 60, "the stream's generation to stop", served)


def _api_log(served: Service) -> str:
    return (served.data_dir / "api.log").read_text(errors="replace")
