"""Default hyperparameters per base model: the user's recipe, tuned for the tiny built-in model.

The user's recipe (3 epochs, batch 4 x gradient accumulation 4 = 16 samples per optimizer step, lr 2e-4, LoRA r 8 /
alpha 16 on q_proj and v_proj) is the default for real models. ``batch_size`` is the samples per optimizer step;
how many go through one forward pass is the worker's choice (on CUDA: as many as the free memory holds, see
``workers.training.cuda.plan``), so the user's accumulation is not a setting of its own. The built-in model is 2
layers of
width 128 and learns too slowly with it, so it gets a higher learning rate and LoRA on every linear layer (see
docs/benchmarks.md for the measurement).
"""

from __future__ import annotations

from service.jobs.models import Hyperparameters, ResolvedHyperparameters

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
