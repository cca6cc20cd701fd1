"""Compare the base model and the adapter on held-out examples: accuracy, macro-F1, confusion, format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from service.prompts import LABELS, Example, Label, is_valid_response
from service.scoring import BASE, build_prompts, classify, generate

BATCH = 16  # held-out items per classify pass (x2: base and adapter share it)
GENERATED_SAMPLES = 16
T = TypeVar("T")
R = TypeVar("R")


def label_metrics(gold: list[Label], predicted: list[Label]) -> dict[str, Any]:
    confusion = {g: {p: 0 for p in LABELS} for g in LABELS}
    for g, p in zip(gold, predicted, strict=True):
        confusion[g][p] += 1
    f1s = []
    for label in LABELS:
        tp = confusion[label][label]
        fp = sum(confusion[g][label] for g in LABELS if g != label)
        fn = sum(confusion[label][p] for p in LABELS if p != label)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    correct = sum(confusion[label][label] for label in LABELS)
    return {
        "accuracy": round(correct / len(gold), 4) if gold else 0.0,
        "macro_f1": round(sum(f1s) / len(f1s), 4),
        "confusion": confusion,  # rows: gold label, columns: predicted
    }


def in_chunks(run: Callable[[list[T]], list[R]], items: list[T], size: int) -> list[R]:
    """``run`` over ``items`` in chunks of ``size``, halving the chunk after running out of GPU memory (a small
    card, or a job held to ``FLASHTUNE_GPU_MEMORY_GIB``) instead of failing a job whose training is done."""
    out: list[R] = []
    while len(out) < len(items):
        try:
            out += run(items[len(out) : len(out) + size])
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size //= 2
            torch.cuda.empty_cache()
    return out


def _compare(model: Any, tokenizer: Any, labelled: list[Example], names: list[str]) -> dict[str, dict[str, Any]]:
    """Label metrics and response format of each named adapter (``BASE``: none), all of them in the same batches
    (peft's mixed-adapter batches): one pass scores and one ``generate`` writes for base and adapter alike."""
    pairs = [(e, name) for e in labelled for name in names]
    samples = [(e, name) for e in labelled[:GENERATED_SAMPLES] for name in names]

    def predict(chunk: list[tuple[Example, str]]) -> list[Label]:
        texts, instructions = [e.input for e, _ in chunk], [e.instruction for e, _ in chunk]
        return [p.label for p in classify(model, tokenizer, texts, instructions, [n for _, n in chunk])]

    def write(chunk: list[tuple[Example, str]]) -> list[str]:
        prompts = build_prompts(model, tokenizer, [e.input for e, _ in chunk], [e.instruction for e, _ in chunk])
        return generate(model, tokenizer, prompts, 96, [n for _, n in chunk])

    predicted = in_chunks(predict, pairs, BATCH * len(names))
    answers = in_chunks(write, samples, len(samples))
    gold = [e.label for e in labelled if e.label is not None]
    results = {}
    for name in names:
        result = label_metrics(gold, [p for p, (_, n) in zip(predicted, pairs, strict=True) if n == name])
        mine = [a for a, (_, n) in zip(answers, samples, strict=True) if n == name]
        result["valid_format"] = round(sum(map(is_valid_response, mine)) / len(mine), 4) if mine else 0.0
        results[name] = result
    return results


def evaluate(model: Any, tokenizer: Any, validation: list[Example]) -> dict[str, Any]:
    """Metrics of the base (adapter disabled) and of the adapter on the labelled validation examples."""
    labelled = [e for e in validation if e.label is not None]
    if not labelled:
        return {"num_labelled": 0, "base": {}, "adapter": {}}
    adapter = model.active_adapter
    results = _compare(model, tokenizer, labelled, [BASE, adapter])
    return {"num_labelled": len(labelled), "base": results[BASE], "adapter": results[adapter]}
