"""Compare the base model and the adapter on held-out examples: accuracy, macro-F1, confusion, format."""

from __future__ import annotations

from typing import Any

from service.prompts import LABELS, Example, Label, is_valid_response
from service.scoring import build_prompts, classify, generate

BATCH = 16
GENERATED_SAMPLES = 16


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


def _predict_and_generate(model: Any, tokenizer: Any, labelled: list[Example]) -> dict[str, Any]:
    predicted: list[Label] = []
    for i in range(0, len(labelled), BATCH):
        chunk = labelled[i : i + BATCH]
        predicted += [
            p.label for p in classify(model, tokenizer, [e.input for e in chunk], [e.instruction for e in chunk])
        ]
    sample = labelled[:GENERATED_SAMPLES]
    prompts = build_prompts(model, tokenizer, [e.input for e in sample], [e.instruction for e in sample])
    answers = generate(model, tokenizer, prompts, 96)
    gold = [e.label for e in labelled if e.label is not None]
    result = label_metrics(gold, predicted)
    result["valid_format"] = round(sum(map(is_valid_response, answers)) / len(answers), 4) if answers else 0.0
    return result


def evaluate(model: Any, tokenizer: Any, validation: list[Example]) -> dict[str, Any]:
    """Metrics of the base (adapter disabled) and of the adapter on the labelled validation examples."""
    labelled = [e for e in validation if e.label is not None]
    if not labelled:
        return {"num_labelled": 0, "base": {}, "adapter": {}}
    with model.disable_adapter():
        base = _predict_and_generate(model, tokenizer, labelled)
    adapter = _predict_and_generate(model, tokenizer, labelled)
    return {"num_labelled": len(labelled), "base": base, "adapter": adapter}
