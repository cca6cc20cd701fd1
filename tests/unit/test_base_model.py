"""Where a base model name leads, what an adapter says about its base, and the small hardening helpers of issue 20
(sections 3 and 6): hub ids only through the hub cache, public names only in saved adapters, ids in ASCII digits,
no coercion in request bodies, the limits and links in the published schema, stale scratch files."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.api.schemas.fine_tuning import job_number
from service.api.security import canonical_id
from service.core import scratch
from service.core.bodies import json_kinds
from service.core.config import Settings
from service.core.layout import adapter_job_id
from service.jobs.hyperparameters import Hyperparameters
from service.jobs.models import JobCreate
from service.llm.modeling import (
    BaseModelRejected,
    ModelLoadError,
    load_model,
    name_base_publicly,
    plan_load,
    public_base_name,
    resolve_base_model,
    validate_base_model,
)
from tests.conftest import hub_snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_public_names_carry_no_server_path(tmp_path: Path) -> None:
    assert public_base_name("builtin") == "builtin"
    assert public_base_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert public_base_name(str(tmp_path / "models" / "builtin-v1")) == "builtin"
    assert public_base_name(str(tmp_path / "hub" / "models--org--name" / "snapshots" / "abc")) == "org/name"
    assert public_base_name(str(tmp_path / "models" / "my-model")) == "my-model"


def test_a_hub_id_resolves_only_through_the_hub_cache(
    hub_cache: Path,
    tmp_path: Path,
    builtin_model_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    snapshot = hub_snapshot(hub_cache, "testorg/tiny", builtin_model_cache)
    assert resolve_base_model("testorg/tiny", settings) == str(snapshot)
    # a folder shaped like a hub id under the working directory is never what a hub id means
    monkeypatch.chdir(tmp_path)
    shutil.copytree(builtin_model_cache, tmp_path / "evilorg" / "model")
    messages = []
    for name in ("evilorg/model", "evilorg/missing"):
        assert validate_base_model(name, settings) == name  # a well-formed hub id is accepted at queue time
        with caplog.at_level(logging.WARNING, logger="flashtune.model"), pytest.raises(ModelLoadError) as info:
            resolve_base_model(name, settings)
        messages.append(str(info.value).replace(name, "NAME"))
        assert str(tmp_path) not in str(info.value) and "HF_HOME" in info.value.hint
    assert messages[0] == messages[1]  # the caller cannot tell which folders exist
    assert "LocalEntryNotFoundError" in caplog.text  # the operator's log has the reason


def test_a_local_path_is_checked_again_when_loaded(tmp_path: Path, builtin_model_cache: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    inside = tmp_path / "data" / "models" / "mine"
    shutil.copytree(builtin_model_cache, inside)
    assert resolve_base_model(validate_base_model(str(inside), settings), settings) == str(inside)
    outside = tmp_path / "elsewhere"
    shutil.copytree(builtin_model_cache, outside)
    with pytest.raises(BaseModelRejected):
        validate_base_model(str(outside), settings)
    with pytest.raises(ModelLoadError) as info:  # a job row that names it anyway (edited, or the roots changed)
        resolve_base_model(str(outside), settings)
    assert str(tmp_path) not in str(info.value)
    for name in ("org/name\n", "org/na me", "/etc\n"):
        with pytest.raises(BaseModelRejected):
            validate_base_model(name, settings)


def test_a_published_adapter_names_its_base_publicly(tmp_path: Path, builtin_model_cache: Path) -> None:
    """peft writes the base's folder into adapter_config.json and README.md; publishing puts its public name there."""
    from peft import LoraConfig, get_peft_model

    model = load_model(str(builtin_model_cache), plan_load("cpu", "auto"))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter), safe_serialization=True)
    assert str(builtin_model_cache) in (adapter / "adapter_config.json").read_text()  # what peft writes
    name_base_publicly(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "builtin"
    assert "base_model: builtin" in (adapter / "README.md").read_text()
    for path in adapter.iterdir():
        assert str(builtin_model_cache.parent) not in path.read_text(errors="replace"), path.name


def test_ids_are_ascii_digits_written_one_way() -> None:
    assert job_number("ftjob-12") == 12 and job_number("12") == 12
    for alias in ("ftjob-١", "ftjob-١٢", "ftjob-01", "ftjob-1\n", "ftjob-+1", "ftjob-1_0", "ftjob- 1"):
        assert job_number(alias) is None, alias
    assert adapter_job_id("job-7") == 7
    for alias in ("job-١", "job-7\n", "job-07", "job-7 "):
        assert adapter_job_id(alias) is None, alias
    assert canonical_id("12") == "12"
    for alias in ("1_2", "012", "+12", " 12", "١٢"):
        with pytest.raises(ValueError):
            canonical_id(alias)


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", True), ("epochs", "1"), ("epochs", 1.5), ("learning_rate", "0.1"), ("lora_dropout", False)],
)
def test_request_bodies_convert_nothing(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate({"dataset": "builtin", "hyperparameters": {field: value}})
    assert [e["loc"] for e in info.value.errors()] == [("hyperparameters", field)]


def test_an_integer_field_takes_a_number_without_fraction() -> None:
    """JSON Schema counts 2.0 as an integer, so the published schema allows it: the body takes it as 2."""
    assert Hyperparameters.model_validate({"epochs": 2.0}).epochs == 2
    assert json_kinds(int | None) == {int}
    assert json_kinds(int | str) == {int, str}
    assert json_kinds(list[int] | None) is None


def test_the_published_schema_has_every_limit_and_link(tmp_path: Path) -> None:
    from service.api import openapi
    from service.api.main import create_app

    settings = Settings(data_dir=tmp_path, max_text_chars=123, max_new_tokens_limit=7, max_batch_items=3)
    schema = create_app(settings).openapi()  # built once, limits and links added
    assert openapi.add_limits(schema, settings) == [] and openapi.add_links(schema) == []
    analyze = schema["components"]["schemas"]["AnalyzeRequest"]["properties"]
    assert analyze["text"]["maxLength"] == 123
    assert any(branch.get("maximum") == 7 for branch in analyze["max_new_tokens"]["anyOf"])
    assert schema["components"]["schemas"]["AnalyzeBatchRequest"]["properties"]["items"]["maxItems"] == 3


def test_stale_scratch_files_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f"flashtune-import-{dead_pid}-abc.db"
        live = tmp_path / f"flashtune-import-{alive.pid}-def.db"
        legacy = tmp_path / "flashtune-import-xyz.db"  # no pid in the name: not ours to judge
        for path in (stale, live, legacy):
            path.write_bytes(b"x")
        assert scratch.remove_stale("import", tmp_path) == [stale]
        assert not stale.exists() and live.exists() and legacy.exists()
    finally:
        alive.kill()
        alive.wait()
    assert scratch.prefix("import").startswith("flashtune-import-")


def test_the_sqlite_import_copy_is_a_named_scratch_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3
    import tempfile

    from service.datasets.sqlite_import import open_readonly

    database = tmp_path / "upload.db"
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with open_readonly(database.read_bytes()):
        copies = list((tmp_path / "tmp").iterdir())
        assert [p.name.startswith(scratch.prefix("import")) for p in copies] == [True]
    assert list((tmp_path / "tmp").iterdir()) == []
