"""scripts/lint-deploy.sh's checks: every FLASHTUNE_* variable compose.yaml sets is a setting and every one it
interpolates is known (docker/check_compose.py); the images pin the tested versions (docker/freeze_constraints.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "docker" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_compose_uses_only_known_variables() -> None:
    assert load("check_compose").unknown_variables(ROOT / "compose.yaml") == []


def test_a_misspelt_variable_is_named(tmp_path: Path) -> None:
    text = (ROOT / "compose.yaml").read_text()
    bad = tmp_path / "compose.yaml"
    bad.write_text(
        text.replace("FLASHTUNE_GPU_MEMORY_GIB: ${", "FLASHTUNE_GPU_MEMORY_GB: ${").replace(
            "${FLASHTUNE_PUBLISH:-", "${FLASHTUNE_PUBLSH:-"
        )
    )
    found = load("check_compose").unknown_variables(bad)
    assert any("services/worker/environment: FLASHTUNE_GPU_MEMORY_GB is not a FlashTune setting" in f for f in found)
    assert any("${FLASHTUNE_PUBLSH} is neither a setting nor in OTHER_ENV_NAMES" in f for f in found)


def test_pins_that_drifted_are_named() -> None:
    freeze = load("freeze_constraints")
    pinned = "# header\nalpha==1.0\nbeta==2.0\ngone==0.1\n"
    assert freeze.differences(pinned, {"alpha": "1.0", "beta": "2.1", "new": "3.0"}) == [
        "beta: pinned 2.0, tested 2.1",
        "gone: pinned 0.1, not a dependency any more",
        "new: tested 3.0, not pinned",
    ]


def test_the_images_pin_the_tested_torch() -> None:
    assert load("freeze_constraints").torch_differences() == []
