"""``prompt_format: "chat_template"``: the same instruction and input rendered through the tokenizer's chat template,
for training (token_cache), evaluation, a promotion's incumbent and serving (scoring.build_prompts, the engine's
per-adapter format from training_info.json, which /analyze and the chat completions use: tests/unit/test_chat_prompt.py
for the latter); the default stays the user's format (service/llm/prompts.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service.core.config import Settings
from service.core.layout import AdapterRef
from service.jobs.hyperparameters import Hyperparameters, resolve
from service.llm.builtin.model import builtin_tokenizer
from service.llm.prompts import Example, Label, NewsItem, in_format, prompt_format_of, render_chat_prompt, render_prompt
from service.llm.scoring import Prediction, build_prompts
from service.serving.engine import ModelServer
from workers.training import evaluation, incumbent
from workers.training.token_cache import cache_key, tokenize_one

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
NEWS = "美联储宣布加息25个基点"


def chat_tokenizer(template: str = TEMPLATE) -> Any:
    tokenizer = copy.deepcopy(builtin_tokenizer())
    tokenizer.chat_template = template
    return tokenizer


def test_the_default_is_the_users_format() -> None:
    assert resolve(Hyperparameters(), "some/model").prompt_format == "flashtune"
    assert render_prompt(NEWS, "分析") == f"### 指令:\n分析\n\n### 输入:\n{NEWS}\n\n### 回答:\n"
    assert prompt_format_of({}) == "flashtune" and prompt_format_of({"hyperparameters": {"seed": 1}}) == "flashtune"


def test_chat_template_renders_system_and_user_messages() -> None:
    tokenizer = chat_tokenizer()
    prompt = render_prompt(NEWS, "分析以下财经快讯对市场的影响", "chat_template", tokenizer)
    assert prompt == f"<|system|>分析以下财经快讯对市场的影响\n<|user|>{NEWS}\n<|assistant|>"
    assert resolve(Hyperparameters(prompt_format="chat_template"), "m/x").prompt_format == "chat_template"
    assert prompt_format_of({"hyperparameters": {"prompt_format": "chat_template"}}) == "chat_template"


def test_a_template_without_a_system_role_gets_the_instruction_in_the_user_message() -> None:
    prompt = render_chat_prompt(chat_tokenizer(NO_SYSTEM), NEWS, "分析")
    assert prompt == f"[user] 分析\n\n{NEWS}\n[assistant] "


def test_no_chat_template_is_refused() -> None:
    with pytest.raises(ValueError, match="chat template"):
        render_chat_prompt(builtin_tokenizer(), NEWS, "分析")


def test_training_rows_train_the_response_only() -> None:
    tokenizer = chat_tokenizer()
    example = Example("分析", NEWS, "这是一条3星级的财经快讯，属于利空消息。")
    ids, labels = tokenize_one(example, tokenizer, "chat_template")
    prompt_ids = tokenizer(render_prompt(NEWS, "分析", "chat_template", tokenizer))["input_ids"]
    assert ids[: len(prompt_ids) - 1] == prompt_ids[:-1]
    assert labels[: len(prompt_ids) - 1] == [-100] * (len(prompt_ids) - 1)
    assert labels[-1] == tokenizer.eos_token_id
    assert cache_key([example], tokenizer, "chat_template") != cache_key([example], tokenizer)


def test_serving_prompts_an_adapter_in_its_format() -> None:
    tokenizer = chat_tokenizer()
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048))
    item = in_format(NEWS, "chat_template")
    assert isinstance(item, NewsItem) and in_format(NEWS, "flashtune") == NEWS
    chat, plain = build_prompts(model, tokenizer, [item, NEWS], ["分析", "分析"])
    assert chat == render_prompt(NEWS, "分析", "chat_template", tokenizer)
    assert plain == render_prompt(NEWS, "分析")
    with_fields = in_format(NewsItem(NEWS, {"star": 4}), "chat_template")
    assert build_prompts(model, tokenizer, [with_fields], ["分析"])[0].endswith(f"{NEWS}\n星级:4\n<|assistant|>")


def test_in_format_keeps_the_default_plain_and_a_news_items_fields() -> None:
    assert in_format(NEWS, "flashtune") == NEWS
    item = NewsItem(NEWS, {"star": 4})
    assert in_format(item, "flashtune") is item
    assert in_format(item, "chat_template") == NewsItem(NEWS, {"star": 4}, "chat_template")
    assert in_format(NEWS, "chat_template") == NewsItem(NEWS, prompt_format="chat_template")


def _adapter(folder: Path, prompt_format: str | None) -> Path:
    """A published adapter's folder as the engine and the incumbent read it (the weights are never loaded here)."""
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    hp = {} if prompt_format is None else {"prompt_format": prompt_format}
    (folder / "training_info.json").write_text(json.dumps({"hyperparameters": hp}))
    return folder


def test_the_engine_reads_each_adapters_format_from_its_record(tmp_path: Path) -> None:
    server = ModelServer(Settings(data_dir=tmp_path))
    chat = AdapterRef("job-1", _adapter(tmp_path / "job-1", "chat_template"))
    older = AdapterRef("job-2", _adapter(tmp_path / "job-2", None))  # a record from before prompt_format
    assert [server.prompt_format(a) for a in (chat, older, None)] == ["chat_template", "flashtune", "flashtune"]


class _StandIn:
    """The peft model's adapter doors the incumbent comparison uses."""

    active_adapter = "default"

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load_adapter(self, folder: str, adapter_name: str, is_trainable: bool) -> None:
        self.loaded.append(adapter_name)

    def delete_adapter(self, name: str) -> None:
        self.loaded.remove(name)

    def set_adapter(self, name: str) -> None:
        assert name == "default"


PROBS: dict[Label, float] = {"bearish": 0.9, "neutral": 0.05, "bullish": 0.05}
LABELLED = [Example("分析", NEWS, "这是一条3星级的财经快讯，属于利空消息。"), Example("分析", "b", "属于利好消息")]


def _classified(monkeypatch: pytest.MonkeyPatch, module: object) -> list[object]:
    """What ``module``'s classify is handed as texts (each answered bearish)."""
    texts: list[object] = []

    def classify(model: Any, tokenizer: Any, chunk: list[object], *args: Any, **kwargs: Any) -> list[Any]:
        texts.extend(chunk)
        return [Prediction("bearish", PROBS, 3, "下跌", (0.0, -9.0, -9.0)) for _ in chunk]

    monkeypatch.setattr(module, "classify", classify)
    return texts


@pytest.mark.parametrize("prompt_format", ["chat_template", "flashtune"])
def test_the_incumbent_is_prompted_in_its_own_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prompt_format: str
) -> None:
    """A promotion's incumbent is scored as it was trained (its own training_info.json), whatever the new job's."""
    texts = _classified(monkeypatch, incumbent)
    folder = _adapter(tmp_path / "job-1", prompt_format)
    result = incumbent.compare(_StandIn(), chat_tokenizer(), LABELLED, ("job-1", folder))
    assert result["prompt_format"] == prompt_format and result["accuracy"] == 0.5
    assert texts == [in_format(e.input, prompt_format) for e in LABELLED]


def test_a_chat_template_incumbent_on_a_base_without_a_template_is_not_compared(tmp_path: Path) -> None:
    folder = _adapter(tmp_path / "job-1", "chat_template")
    model = _StandIn()
    result = incumbent.compare(model, builtin_tokenizer(), LABELLED, ("job-1", folder))
    assert "chat template" in result["error"] and model.loaded == []  # the promotion keeps the alias, says why


def test_the_evaluation_prompts_base_and_adapter_in_the_jobs_format(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _classified(monkeypatch, evaluation)
    monkeypatch.setattr(
        evaluation, "generate", lambda model, tokenizer, prompts, *args: ["属于利空消息"] * len(prompts)
    )
    model = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=SimpleNamespace(type="cpu"))]))
    model.config = SimpleNamespace(max_position_embeddings=2048)
    evaluation._compare(model, chat_tokenizer(), LABELLED, ["base", "adapter"], "chat_template")
    assert texts == [in_format(e.input, "chat_template") for e in LABELLED for _ in ("base", "adapter")]


# ------------------------------------------------------------- a chat-format adapter on a base without a template
@pytest.fixture
def templateless_api(builtin_model_cache: Path, tmp_path: Path) -> Any:
    """The API in process, serving the built-in base (its tokenizer has no chat template), with adapter job-1
    trained with ``prompt_format: chat_template`` (as if its base had had one) and job-2 in the default format."""
    import torch
    from fastapi.testclient import TestClient
    from peft import LoraConfig, get_peft_model
    from sqlmodel import Session
    from transformers import AutoModelForCausalLM

    from service.api.main import create_app
    from service.jobs.models import Job

    settings = Settings(data_dir=tmp_path, base_model=str(builtin_model_cache), device="cpu")
    settings.ensure_dirs()
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_cache), LoraConfig(r=2))
    for job_id, prompt_format in ((1, "chat_template"), (2, "flashtune")):
        folder = settings.layout.adapters / f"job-{job_id}"
        model.save_pretrained(str(folder))
        info = {"hyperparameters": {"prompt_format": prompt_format}, "input_fields": []}
        (folder / "training_info.json").write_text(json.dumps(info))
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        with Session(app.state.engine) as session:
            for job_id, prompt_format in ((1, "chat_template"), (2, "flashtune")):
                hp = {"prompt_format": prompt_format}
                job = Job(id=job_id, base_model=settings.base_model, dataset="builtin", hyperparameters=hp)
                job.status, job.adapter = "succeeded", f"job-{job_id}"
                session.add(job)
            session.commit()
        yield client


def test_a_chat_format_adapter_on_a_base_without_a_template_is_a_409_naming_it(templateless_api: Any) -> None:
    """Before the fix each of these was a 500 (render_chat_prompt's ValueError), and in /analyze it failed every
    request of the micro-batch it joined; now the request is refused before it is queued, naming the adapter."""
    client = templateless_api
    requests = [
        ("/analyze", {"text": NEWS, "adapter": "job-1", "max_new_tokens": 2}, "adapter"),
        ("/analyze/batch", {"items": [NEWS], "adapter": "job-1", "max_new_tokens": 2}, "adapter"),
        ("/v1/chat/completions", {"model": "job-1", "messages": [{"role": "user", "content": NEWS}]}, "model"),
    ]
    for path, body, field in requests:
        response = client.post(path, json=body)
        assert response.status_code == 409, (path, response.text)
        error = response.json()["error"]
        assert error["type"] == "prompt_format_unavailable" and error["details"][0]["field"] == field
        assert "job-1" in error["message"] and "prompt_format 'flashtune'" in error["message"]
    served = client.post("/analyze", json={"text": NEWS, "adapter": "job-2", "max_new_tokens": 2})
    assert served.status_code == 200 and served.json()["adapter"] == "job-2"


def test_a_chat_format_job_on_a_local_base_without_a_template_is_refused_when_queued(templateless_api: Any) -> None:
    client = templateless_api
    refused = client.post("/jobs", json={"dataset": "builtin", "hyperparameters": {"prompt_format": "chat_template"}})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["details"][0]["field"] == "hyperparameters.prompt_format"
    hub = {"dataset": "builtin", "base_model": "org/chat-model", "hyperparameters": {"prompt_format": "chat_template"}}
    assert client.post("/jobs", json=hub).status_code == 201  # no files here: its worker's load tells
    assert client.post("/jobs", json={"dataset": "builtin"}).status_code == 201
