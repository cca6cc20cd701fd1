"""Loading a base model the same way for training and serving: built-in, hub id or local path.

On CUDA the base is loaded in 4-bit NF4 with double quantisation and bf16 compute (QLoRA) unless the job asks
for ``quantization: "none"``; elsewhere it is loaded unquantised in float32, because bitsandbytes' 4-bit
kernels need a GPU. ``describe_load`` says which and why, for the job's events.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from service.core.config import Settings
from service.llm.builtin.model import BUILTIN_NAME, ensure_builtin_model


class ModelLoadError(Exception):
    """The base model cannot be found or loaded; the message says what to change."""


@dataclass(frozen=True)
class LoadPlan:
    device: str
    quantization: Literal["nf4", "none"]
    dtype: torch.dtype
    reason: str


def resolve_base_model(name: str, data_dir: Path) -> str:
    """The ``from_pretrained`` argument for a base model name: the built-in path, a local path or a hub id."""
    if name == BUILTIN_NAME:
        return str(ensure_builtin_model(data_dir))
    return name


_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")
BASE_MODEL_HINT = "use 'builtin', a hub id 'org/name', or a local model folder under an allowed model root"


class BaseModelRejected(ValueError):
    """A requested base model is neither built-in, a hub id, nor a folder under an allowed root."""


def validate_base_model(name: str, settings: Settings) -> str:
    """The base model a job may use, as stored on the job; raises BaseModelRejected otherwise.

    Accepted: ``builtin``, the server's own configured base model, a hub id ``org/name``, or an absolute path
    that resolves (symlinks followed) to an existing folder inside one of ``settings.model_roots``; a local path is
    returned resolved, so what the worker loads is what was checked. Everything that could point elsewhere is
    refused: ``..`` segments, percent-encoded or backslash forms, ``~``, NUL and other control characters. The
    message never echoes the path or the roots, so a refusal tells nothing about the server's file system.
    """
    if name in (BUILTIN_NAME, settings.base_model):
        return name
    if any(ord(c) < 32 or c in "%\\~" for c in name) or ".." in name.split("/") or "\x7f" in name:
        raise BaseModelRejected(BASE_MODEL_HINT)
    if HUB_ID.match(name) and ".." not in name and "--" not in name:
        return name
    if not name.startswith("/"):
        raise BaseModelRejected(BASE_MODEL_HINT)
    try:
        resolved = Path(name).resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as exc:  # missing, a symlink loop, an unrepresentable path
        raise BaseModelRejected(BASE_MODEL_HINT) from exc
    for root in settings.model_roots:
        try:
            root_resolved = root.resolve(strict=True)
        except OSError:
            continue
        if resolved != root_resolved and resolved.is_relative_to(root_resolved) and resolved.is_dir():
            return str(resolved)
    raise BaseModelRejected(BASE_MODEL_HINT)


def pick_device(setting: str) -> str:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("FLASHTUNE_DEVICE=cuda but no CUDA device is visible; use 'auto' or 'cpu'")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def plan_load(device: str, quantization: str) -> LoadPlan:
    if device == "cuda":
        if quantization == "none":
            return LoadPlan("cuda", "none", torch.bfloat16, "CUDA with quantization 'none': bf16 base, LoRA")
        return LoadPlan("cuda", "nf4", torch.bfloat16, "CUDA available: 4-bit NF4 base (QLoRA), bf16 compute")
    if quantization == "nf4":
        raise ModelLoadError("quantization 'nf4' needs a CUDA GPU (bitsandbytes 4-bit); use 'auto' or 'none'")
    return LoadPlan("cpu", "none", torch.float32, "no CUDA device: plain LoRA on the unquantised float32 base")


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of base model {source!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: str, plan: LoadPlan) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": plan.dtype, "trust_remote_code": False}
    if plan.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # a multi-GPU rank has set its own device
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load base model {source!r}: {exc}") from exc
    if plan.quantization != "nf4":
        model.to(plan.device)  # type: ignore[arg-type]
    return model


def fuse_layers(model: Any) -> bool:
    """Swap in Liger's fused RMSNorm, RoPE and SwiGLU kernels where liger-kernel is installed and supports the model
    type (CUDA only). Liger also patches transformers' module for that model type, so later models of the type in
    this process get the kernels too."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    # Liger warns, on every model, that its optional CuTe-DSL and Ascend backends are missing; its Triton kernels
    # are the ones used here.
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True
