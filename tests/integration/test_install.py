"""scripts/install.sh picks where torch comes from: the CPU build on a Linux machine without an NVIDIA GPU (never
PyPI's multi-GB CUDA build), PyPI's on one with a GPU, a local wheel offline, an index the operator names
(``--torch-plan`` prints the choice and installs nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the CPU index choice is Linux's")


def plan(tmp_path: Path, gpu: bool, local_wheels: bool, index: str | None = None) -> str:
    """``install.sh --torch-plan`` in a checkout without .venv; ``gpu``: a fake nvidia-smi that lists a T4;
    ``local_wheels``: pip's own configuration (this machine's find-links) or none at all."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "scripts", project / "scripts")
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "FLASHTUNE_TORCH_INDEX_URL")}
    env["PYTHON"] = sys.executable
    env["PIP_NO_INDEX"] = "1"  # nothing from the network: a plan, not a download
    if not local_wheels:
        env["PIP_CONFIG_FILE"] = os.devnull
    elif os.environ.get("PIP_FIND_LINKS"):
        env["PIP_FIND_LINKS"] = os.environ["PIP_FIND_LINKS"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpu:
        (bin_dir / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: Tesla T4 (UUID: GPU-0)"\n')
        (bin_dir / "nvidia-smi").chmod(0o755)
    path = [d for d in env["PATH"].split(":") if not (Path(d) / "nvidia-smi").exists()]
    env["PATH"] = ":".join([str(bin_dir), *path])
    if index:
        env["FLASHTUNE_TORCH_INDEX_URL"] = index
    command = ["bash", "scripts/install.sh", "--torch-plan"]
    out = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_no_gpu_gets_the_cpu_build(tmp_path: Path) -> None:
    assert plan(tmp_path, gpu=False, local_wheels=False) == "torch 2.13.0: cpu https://download.pytorch.org/whl/cpu"


def test_a_gpu_gets_pypi_s_cuda_build(tmp_path: Path) -> None:
    assert plan(tmp_path, gpu=True, local_wheels=False) == "torch 2.13.0: pypi"


def test_an_index_named_by_the_operator_wins(tmp_path: Path) -> None:
    url = "https://download.pytorch.org/whl/cu126"
    assert plan(tmp_path, gpu=False, local_wheels=False, index=url) == f"torch 2.13.0: index {url}"


def test_a_local_wheel_installs_offline(tmp_path: Path) -> None:
    dry_run = ["install", "--dry-run", "--ignore-installed", "--no-index", "--no-deps", "-q", "torch==2.13.0"]
    probe = subprocess.run([sys.executable, "-m", "pip", *dry_run], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no local torch 2.13.0 wheel on this machine")
    assert plan(tmp_path, gpu=False, local_wheels=True) == "torch 2.13.0: local"
