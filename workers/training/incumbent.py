"""The incumbent of a promotion: the adapter an alias points at, scored on the new job's own held-out items.

A job that asked to be promoted (``promote_to``, service/jobs/aliases.py) must beat both the base and the alias's
current adapter on the same items. The recipe's evaluation scores the base and the new adapter; :func:`compare`
loads the incumbent beside the new adapter in the same model (``TrainingSpec.compare_with``: its name and folder),
scores the same labelled items through ``service.llm.scoring.classify``, and drops it again before the new adapter
is published (``save_pretrained`` would save it too). Each adapter is prompted as it was trained and as /analyze
prompts it: the incumbent in the ``prompt_format`` of its own training_info.json (service/llm/prompts.py
``in_format``), which may differ from the new job's. Label metrics only: the promotion compares macro-F1, so no
text is generated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from service.core.training_info import read_training_info
from service.llm.prompts import Example, Label, in_format, prompt_format_of
from service.llm.scoring import classify
from workers.training.evaluation import BATCH, in_chunks, label_metrics

INCUMBENT = "flashtune-incumbent"  # the peft name the incumbent is loaded under, for the comparison only
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
log = logging.getLogger("flashtune.training")


def compare(model: Any, tokenizer: Any, validation: list[Example], incumbent: tuple[str, Path]) -> dict[str, Any]:
    """``{"name", "prompt_format", "accuracy", "macro_f1", "confusion"}`` of the incumbent on the labelled
    ``validation`` items, prompted in its own ``prompt_format``, or ``{"name", "error"}`` when it cannot be loaded or
    prompted (the promotion then says so and keeps the alias)."""
    name, folder = incumbent
    labelled = [e for e in validation if e.label is not None]
    refused = _refused(name, folder)
    if refused or not labelled:
        return {"name": name, "error": refused or "no labelled held-out items"}
    prompt_format = prompt_format_of(read_training_info(folder))  # as it was trained, as /analyze prompts it
    if prompt_format == "chat_template" and getattr(tokenizer, "chat_template", None) is None:
        return {
            "name": name,
            "error": f"{name} was trained with prompt_format chat_template; this base has no chat template",
        }
    active = model.active_adapter
    try:
        model.load_adapter(str(folder), adapter_name=INCUMBENT, is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # another architecture, damaged files
        log.warning("could not load %s to compare with: %s", name, exc)
        return {"name": name, "error": f"{name} could not be loaded beside this adapter ({type(exc).__name__})"}
    try:

        def predict(chunk: list[Example]) -> list[Label]:
            texts, instructions = [in_format(e.input, prompt_format) for e in chunk], [e.instruction for e in chunk]
            return [p.label for p in classify(model, tokenizer, texts, instructions, [INCUMBENT] * len(chunk))]

        predicted = in_chunks(predict, labelled, BATCH)
    finally:
        model.delete_adapter(INCUMBENT)
        model.set_adapter(active)
    gold: list[Label] = [e.label for e in labelled if e.label is not None]
    return {"name": name, "prompt_format": prompt_format, **label_metrics(gold, predicted)}


def _refused(name: str, folder: Path) -> str | None:
    """Why the folder is not loaded, if it is not: only a plain safetensors adapter, as the model server loads."""
    weights = folder / "adapter_model.safetensors"
    if folder.is_symlink() or weights.is_symlink() or not weights.is_file():
        return f"{name} has no adapter_model.safetensors to load"
    if any(p.name.lower().endswith(PICKLE_SUFFIXES) for p in folder.iterdir()):
        return f"{name} holds pickle-capable files; it is not loaded"
    return None
