"""Compare the base model and the adapter on held-out examples: accuracy, macro-F1, confusion, format, and how well
their label probabilities are calibrated; fit the adapter's calibration.

Probabilities: NLL, Brier score, ECE (10 equal-width bins of the top label) and the reliability bins, before and
after temperature scaling (``service.llm.calibration``). The "after" figures are cross-fitted (each item scored with a
temperature fitted on the other folds), since the same split fits the temperature; the temperature the adapter is
served with is fitted on the whole split and kept only where the cross-fitted NLL is lower
(``metrics["calibration"]``, read back by ``service.core.training_info.calibration_temperature``). The answers of the
format check are free generations; the share of them that state the scored label is ``free_text_agrees``
(/analyze itself writes its text after the scored prefix, ``service.llm.scoring.write_analyses``).

Both are scored in the same batches (peft's mixed-adapter batches). The format check generates up to 96 tokens for
each of 16 samples with each of them: on the CPU in one mixed batch through ``generate``; on CUDA one adapter (or the
base) at a time, each decoded with its step captured as a CUDA graph (``service.llm.decoding``), because on an NF4 base
``generate`` spends far longer in Python than the GPU spends on the step (docs/benchmarks.md, session 7).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from service.llm import calibration
from service.llm.decoding import GraphDecoder, attach, eos_ids
from service.llm.prompts import LABELS, Example, Label, NewsItem, in_format, is_valid_response
from service.llm.scoring import BASE, Prediction, adapter_active, build_prompts, classify, generate

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


def probability_metrics(gold: list[Label], predictions: list[Prediction]) -> dict[str, Any]:
    """NLL, Brier score, ECE and reliability bins of the predictions' probabilities, and under ``calibrated`` the fitted
    temperature (whether it is ``applied``), accuracy, macro-F1 and the same measures after calibration, cross-fitted
    (absent with too few items to fit one)."""
    scores = [p.label_logprobs for p in predictions]
    indices = [LABELS.index(g) for g in gold]
    result = calibration.measures([calibration.apply(s) for s in scores], indices)
    fitted = calibration.calibrate(scores, indices)
    if fitted is not None:
        crossed = calibration.cross_fitted(scores, indices)
        labels = [LABELS[max(range(len(LABELS)), key=row.__getitem__)] for row in crossed]
        accuracy = {k: v for k, v in label_metrics(gold, labels).items() if k != "confusion"}
        result["calibrated"] = {
            **fitted.as_dict(),
            "folds": calibration.FOLDS,
            **accuracy,
            **calibration.measures(crossed, indices),
        }
    return result


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


def write_each(
    model: Any, tokenizer: Any, prompts: list[str], names: list[str], max_new_tokens: int, graphs: bool = True
) -> list[str]:
    """The greedy answers to ``prompts``, each with its adapter (``BASE``: none), one adapter at a time, each decoded
    by a :class:`~service.llm.decoding.GraphDecoder` captured with that adapter active and dropped afterwards
    (``graphs=False``: the same step run eagerly, for tests). ``generate`` decodes where capturing fails."""
    answers: dict[int, str] = {}
    for name in dict.fromkeys(names):
        indices = [i for i, n in enumerate(names) if n == name]
        with adapter_active(model, name):
            attach(model, GraphDecoder(model, eos_ids(tokenizer), tokenizer.pad_token_id, limit=1, graphs=graphs))
            try:
                texts = generate(model, tokenizer, [prompts[i] for i in indices], max_new_tokens)
            finally:
                attach(model, None)
        answers.update(zip(indices, texts, strict=True))
    return [answers[i] for i in range(len(prompts))]


def _compare(
    model: Any, tokenizer: Any, labelled: list[Example], names: list[str], prompt_format: str = "flashtune"
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Label metrics and response format of each named adapter (``BASE``: none), scored in the same batches (peft's
    mixed-adapter batches), the answers written as the module docstring says; and the seconds each part took. The
    prompts are written in ``prompt_format`` (the job's, service/llm/prompts.py), for the base too."""
    pairs = [(e, name) for e in labelled for name in names]
    samples = [(e, name) for e in labelled[:GENERATED_SAMPLES] for name in names]
    on_cuda = next(model.parameters()).device.type == "cuda"

    def text(e: Example) -> str | NewsItem:
        return in_format(e.input, prompt_format)

    def predict(chunk: list[tuple[Example, str]]) -> list[Prediction]:
        texts, instructions = [text(e) for e, _ in chunk], [e.instruction for e, _ in chunk]
        return classify(model, tokenizer, texts, instructions, [n for _, n in chunk])

    def write(chunk: list[tuple[Example, str]]) -> list[str]:
        prompts = build_prompts(model, tokenizer, [text(e) for e, _ in chunk], [e.instruction for e, _ in chunk])
        chunk_names = [n for _, n in chunk]
        if on_cuda:
            return write_each(model, tokenizer, prompts, chunk_names, 96)
        return generate(model, tokenizer, prompts, 96, chunk_names)

    started = time.perf_counter()
    predicted = in_chunks(predict, pairs, BATCH * len(names))
    scored = time.perf_counter()
    answers = in_chunks(write, samples, len(samples))
    timings = {"labels": round(scored - started, 2), "generation": round(time.perf_counter() - scored, 2)}
    gold = [e.label for e in labelled if e.label is not None]
    results = {}
    for name in names:
        mine = [p for p, (_, n) in zip(predicted, pairs, strict=True) if n == name]
        result = {**label_metrics(gold, [p.label for p in mine]), **probability_metrics(gold, mine)}
        written = [a for a, (_, n) in zip(answers, samples, strict=True) if n == name]
        result["valid_format"] = _share(map(is_valid_response, written), len(written))
        # the samples are the first of the labelled items, in order: zip pairs each answer with its prediction
        result["free_text_agrees"] = _share(map(Prediction.agrees_with, mine, written), len(written))
        results[name] = result
    return results, timings


def _share(flags: Iterable[bool], count: int) -> float:
    return round(sum(flags) / count, 4) if count else 0.0


def evaluate(model: Any, tokenizer: Any, validation: list[Example], prompt_format: str = "flashtune") -> dict[str, Any]:
    """Metrics of the base (adapter disabled) and of the adapter on the labelled validation examples, prompted in
    ``prompt_format``."""
    labelled = [e for e in validation if e.label is not None]
    if not labelled:
        return {"num_labelled": 0, "base": {}, "adapter": {}}
    adapter = model.active_adapter
    results, seconds = _compare(model, tokenizer, labelled, [BASE, adapter], prompt_format)
    metrics = {"num_labelled": len(labelled), "base": results[BASE], "adapter": results[adapter], "seconds": seconds}
    fitted = results[adapter].get("calibrated")
    if fitted is not None:  # what the adapter is served with
        keys = ("method", "temperature", "applied", "num_items", "nll_before", "nll_after")
        metrics["calibration"] = {k: fitted[k] for k in keys}
    return metrics
