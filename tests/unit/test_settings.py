"""Settings: a ``FLASHTUNE_*`` variable that nothing reads is reported when ``flashtune serve`` or ``flashtune worker``
starts (a typo would otherwise leave the default in force without a word), and the job limits live in the request
schema, not in settings."""

from __future__ import annotations

import logging
import os

import pytest
from pydantic import ValidationError

from service.core.config import (
    OTHER_ENV_NAMES,
    Settings,
    known_env_names,
    unknown_env_names,
    warn_unknown_env,
)
from service.jobs.models import JobCreate


def test_every_setting_and_the_allow_list_are_known() -> None:
    known = known_env_names()
    assert {"FLASHTUNE_DATA_DIR", "FLASHTUNE_GPU_MEMORY_GIB", "FLASHTUNE_MAX_QUEUED_JOBS"} <= known
    assert len(known) == len(Settings.model_fields) + len(OTHER_ENV_NAMES)
    assert "FLASHTUNE_TEST_POSTGRES" in known  # the test harness sets it (tests/conftest.py)


def test_unknown_names_only_those_with_the_prefix_that_nothing_reads() -> None:
    environ = {
        "FLASHTUNE_DATA_DIR": "/data",
        "flashtune_port": "8001",  # pydantic-settings matches names in any case: so does the check
        "FLASHTUNE_URL": "http://127.0.0.1:8000",
        "FLASHTUNE_GPU_MEMORY_GB": "7",
        "FLASHTUNE_MAX_EPOCHS": "10",  # a setting that was never read and is gone
        "flashtune_lease_secs": "5",
        "HF_HUB_OFFLINE": "1",
        "MY_FLASHTUNE_THING": "x",
    }
    assert unknown_env_names(environ) == ["FLASHTUNE_GPU_MEMORY_GB", "FLASHTUNE_MAX_EPOCHS", "flashtune_lease_secs"]


def test_the_warning_names_the_variable_and_the_closest_known_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flashtune.config"):
        lines = warn_unknown_env({"FLASHTUNE_GPU_MEMORY_GB": "7", "FLASHTUNE_ZZZ": "1", "FLASHTUNE_PORT": "1"})
    assert lines == [
        "unknown environment variable FLASHTUNE_GPU_MEMORY_GB is ignored (did you mean FLASHTUNE_GPU_MEMORY_GIB?)",
        "unknown environment variable FLASHTUNE_ZZZ is ignored",
    ]
    assert [r.getMessage() for r in caplog.records] == lines


def test_serve_and_worker_settings_warn_at_start_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``flashtune serve`` and ``flashtune worker`` both build their settings in ``service.cli._settings``."""
    from service.cli import _settings

    for name in [name for name in os.environ if name.upper().startswith("FLASHTUNE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLASHTUNE_BATCH_WAIT_MSEC", "2")
    with caplog.at_level(logging.WARNING, logger="flashtune.config"):
        _settings()
    assert [r.getMessage() for r in caplog.records] == [
        "unknown environment variable FLASHTUNE_BATCH_WAIT_MSEC is ignored (did you mean FLASHTUNE_BATCH_WAIT_MS?)"
    ]


@pytest.mark.parametrize(("field", "value", "bound"), [("epochs", 101, "100"), ("max_length", 8193, "8192")])
def test_job_limits_are_the_request_schemas(field: str, value: int, bound: str) -> None:
    """Epochs and max_length are bounded by ``Hyperparameters`` (a 422 naming the field and the bound on POST /jobs,
    and in the OpenAPI schema); no setting pretends to bound them."""
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate({"dataset": "builtin", "hyperparameters": {field: value}})
    (error,) = info.value.errors()
    assert error["loc"] == ("hyperparameters", field) and bound in error["msg"]
    assert not hasattr(Settings(), "max_epochs") and not hasattr(Settings(), "max_length_limit")
