"""What a job's training may be told, and what it is told: the request shape, the recipes, and ``resolve()``.

``Hyperparameters`` is what a user may set (``POST /jobs``, the OpenAI-style ``/v1/fine_tuning/jobs``);
``resolve()`` fills every unset field from the recipe of the job's base model, and the result,
``ResolvedHyperparameters``, is stored on the job and is what the worker trains with.

The user's recipe (3 epochs, batch 4 x gradient accumulation 4 = 16 samples per optimizer step, lr 2e-4, LoRA r 8 /
alpha 16 on q_proj and v_proj) is the default for real models. ``batch_size`` is the samples per optimizer step;
how many go through one forward pass is the worker's choice (on CUDA: as many as the free memory holds, see
``workers.training.cuda.plan``), so the user's accumulation is not a setting of its own. The built-in model is 2
layers of width 128 and learns too slowly with it, so it gets a higher learning rate and LoRA on every linear
layer (see docs/benchmarks.md for the measurement).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.bodies import RequestBody

# A module name as the published schema states it: ASCII letters, digits, '.', '_', '-' (no path, no '..' escape)
ModuleName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]


class Hyperparameters(RequestBody):
    """What a user may set; anything left out is resolved per base model (service/jobs/hyperparameters.py). A request
    body: unknown fields and ``"epochs": true`` or ``"1"`` are refused (service/core/bodies.py)."""

    epochs: int | None = Field(default=None, ge=1, le=100)
    batch_size: int | None = Field(default=None, ge=1, le=1024)
    learning_rate: float | None = Field(default=None, gt=0, le=1.0)
    max_length: int | None = Field(default=None, ge=16, le=8192)
    lora_r: int | None = Field(default=None, ge=1, le=512)
    lora_alpha: float | None = Field(default=None, gt=0, le=4096)
    lora_dropout: float | None = Field(default=None, ge=0, lt=1)
    target_modules: list[ModuleName] | None = Field(default=None, min_length=1, max_length=64)
    quantization: Literal["auto", "nf4", "none"] | None = None
    validation_fraction: float | None = Field(default=None, ge=0, lt=1)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    validation_dataset: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="a dataset id whose examples are the held-out split (validation_fraction then holds out none)",
    )
    prompt_format: Literal["flashtune", "chat_template"] | None = Field(
        default=None,
        description="flashtune (default): the user's '### 指令:' prompt; chat_template: the same instruction and "
        "input through the base tokenizer's chat template (chat models); serving uses the adapter's",
    )
    step_order: Literal["balanced", "shuffled"] | None = Field(
        default=None,
        description="balanced (default): each epoch's shuffled samples swapped between steps until every step holds "
        "about as many tokens, ~13% faster on a GPU; shuffled: the shuffle as it falls, as TRL and Unsloth order "
        "them (on the seed job 0.5-1% lower held-out loss, docs/benchmarks.md)",
    )


class ResolvedHyperparameters(BaseModel):
    """Every setting of a job's training, stored on the job (``Job.hyperparameters``) and read by the worker."""

    model_config = ConfigDict(extra="forbid")

    epochs: int
    batch_size: int
    learning_rate: float
    max_length: int
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str]
    quantization: Literal["auto", "nf4", "none"]
    validation_fraction: float
    seed: int
    validation_dataset: str | None = None
    prompt_format: Literal["flashtune", "chat_template"] = "flashtune"  # service/llm/prompts.py PROMPT_FORMATS
    step_order: Literal["balanced", "shuffled"] = "balanced"  # workers/training/steps.py
    # Not user-settable: the memory fallback halves the micro-batch and doubles accumulation.
    micro_batch_size: int
    gradient_accumulation_steps: int
    warmup_ratio: float = 0.05


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

USER_RECIPE: dict[str, object] = {
    "epochs": 3,
    "batch_size": 16,  # the user's per-device 4 x accumulation 4
    "learning_rate": 2e-4,
    "max_length": 512,
    "lora_r": 8,
    "lora_alpha": 16.0,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "quantization": "auto",
    "validation_fraction": 0.1,
    "seed": 42,
}
BUILTIN_RECIPE: dict[str, object] = {
    **USER_RECIPE,
    "epochs": 4,
    "batch_size": 4,
    "learning_rate": 5e-3,
    "max_length": 256,
    "target_modules": ALL_LINEAR,
}


def resolve(hyperparameters: Hyperparameters, base_model: str) -> ResolvedHyperparameters:
    """Fill every unset field from the recipe of ``base_model``; the job object shows the result."""
    recipe = BUILTIN_RECIPE if base_model == "builtin" else USER_RECIPE
    values = {**recipe, **hyperparameters.model_dump(exclude_none=True)}
    values["micro_batch_size"] = values["batch_size"]
    values["gradient_accumulation_steps"] = 1
    return ResolvedHyperparameters.model_validate(values)


def defaults(base_model: str) -> ResolvedHyperparameters:
    """What a job on ``base_model`` trains with when it sets nothing (the dashboard's form, OpenAI's multiplier)."""
    return resolve(Hyperparameters(), base_model)
