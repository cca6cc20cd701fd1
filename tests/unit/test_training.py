"""The trainer on the tiny built-in model for a few steps: LoRA weights move, the base does not."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from service.llm.builtin.data import builtin_dataset
from service.llm.prompts import render_prompt
from tests.conftest import builtin_spec
from workers.training import checkpoints
from workers.training.batches import tokenize
from workers.training.recipe import train
from workers.training.spec import Hooks, TrainingSpec


def _spec(tmp_path: Path, model: Path, steps_examples: int = 16, **hp: object) -> TrainingSpec:
    return builtin_spec(tmp_path, model, train=steps_examples, **hp)


def test_lora_moves_and_base_stays(tmp_path: Path, builtin_model_cache: Path) -> None:
    base_before = load_file(str(builtin_model_cache / "model.safetensors"))
    info = train(_spec(tmp_path, builtin_model_cache), Hooks())
    adapter = load_file(str(tmp_path / "adapters" / "job-1" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any(float(t.abs().sum()) > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at 0
    base_after = load_file(str(builtin_model_cache / "model.safetensors"))
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    assert info["total_steps"] == 4 and len(info["losses"]["step_loss"]) == 4


def test_loss_masks_the_prompt(builtin_model_cache: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(builtin_model_cache))
    example = builtin_dataset()[0][0]
    [(ids, labels)] = tokenize([example], tokenizer, 512)
    prompt_len = len(tokenizer(render_prompt(example.input, example.instruction))["input_ids"])
    assert all(label == -100 for label in labels[:prompt_len])
    assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tokenizer.eos_token_id


def test_interrupt_checkpoints_and_resume_continues(tmp_path: Path, builtin_model_cache: Path) -> None:
    from workers.training.spec import Interrupted

    stop = {"now": False}

    def progress(p, force):  # type: ignore[no-untyped-def]
        stop["now"] = p.step >= 3

    spec = _spec(tmp_path, builtin_model_cache, steps_examples=24)
    try:
        train(spec, Hooks(on_progress=progress, should_stop=lambda: stop["now"]))
        raise AssertionError("expected Interrupted")
    except Interrupted:
        pass
    assert [p.name for p in checkpoints.complete(spec.job_dir)][-1] == "step-00000003"
    events: list[str] = []
    info = train(spec, Hooks(on_event=lambda t, m, d: events.append(t)))
    assert info["resumed_from_step"] == 3 and "resumed" in events
    assert [s for s, _ in info["losses"]["step_loss"]] == [1, 2, 3, 4, 5, 6]
    # published, and the checkpoints are still there: the worker removes them once it has recorded the success
    # (tests/unit/test_success_checkpoints.py), so a takeover before that resumes from the last step, not from 0
    assert [p.name for p in checkpoints.complete(spec.job_dir)] == ["step-00000004", "step-00000006"]


def test_an_attempt_that_dies_after_training_leaves_only_evaluation_and_publishing(
    tmp_path: Path, builtin_model_cache: Path
) -> None:
    """The last step is checkpointed: an attempt that dies while it evaluates (here: when it reports the evaluation)
    leaves the next one no step to train; it resumes at the end, evaluates and publishes the same weights."""
    spec = _spec(tmp_path, builtin_model_cache, steps_examples=12, checkpoint_every=50)  # 3 steps, no periodic one

    def die_at_evaluation(type: str, message: str, data: object) -> None:
        if type == "evaluation":
            raise RuntimeError("the worker died")

    try:
        train(spec, Hooks(on_event=die_at_evaluation))
        raise AssertionError("expected the attempt to die")
    except RuntimeError:
        pass
    assert [p.name for p in checkpoints.complete(spec.job_dir)] == ["step-00000003"] and not spec.adapter_dir.exists()
    trained = load_file(str(checkpoints.complete(spec.job_dir)[-1] / "adapter_model.safetensors"))
    steps: list[int] = []
    events: list[tuple[str, str]] = []
    info = train(
        spec, Hooks(on_progress=lambda p, force: steps.append(p.step), on_event=lambda t, m, d: events.append((t, m)))
    )
    assert steps == [] and info["resumed_from_step"] == info["total_steps"] == 3
    assert ("resumed", "resumed from checkpoint at step 3 (training is done: on to the evaluation)") in events
    assert [s for s, _ in info["losses"]["step_loss"]] == [1, 2, 3] and "evaluation" in [t for t, _ in events]
    published = load_file(str(spec.adapter_dir / "adapter_model.safetensors"))
    assert published.keys() == trained.keys() and all(torch.equal(published[k], trained[k]) for k in trained)


def test_evaluation_scores_base_and_adapter_in_one_batch_as_apart(tmp_path: Path, builtin_model_cache: Path) -> None:
    """The evaluation runs base and adapter in mixed batches; its metrics equal separate passes of each."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.llm.decoding import decoder_for
    from service.llm.scoring import BASE, build_prompts, classify, generate
    from workers.training.evaluation import label_metrics, write_each

    spec = _spec(tmp_path, builtin_model_cache)
    info = train(spec, Hooks())
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_cache)
    base = AutoModelForCausalLM.from_pretrained(builtin_model_cache)
    model = PeftModel.from_pretrained(base, str(spec.adapter_dir)).eval()
    labelled = [e for e in spec.validation if e.label is not None]
    texts, instructions = [e.input for e in labelled], [e.instruction for e in labelled]
    gold = [e.label for e in labelled]
    with model.disable_adapter():
        apart_base = label_metrics(gold, [p.label for p in classify(model, tokenizer, texts, instructions)])
    apart_adapter = label_metrics(gold, [p.label for p in classify(model, tokenizer, texts, instructions)])
    assert info["metrics"]["base"]["confusion"] == apart_base["confusion"]
    assert info["metrics"]["adapter"]["confusion"] == apart_adapter["confusion"]
    assert set(info["metrics"]["seconds"]) == {"labels", "generation"}

    # CUDA writes the format check's answers one adapter at a time, each with a graph decoder captured with it
    # active (here its step runs eagerly): the same answers as the mixed batch
    prompts = build_prompts(model, tokenizer, texts[:3], instructions[:3]) * 2
    names = [BASE] * 3 + [model.active_adapter] * 3
    with torch.no_grad():
        assert write_each(model, tokenizer, prompts, names, 16, graphs=False) == generate(
            model, tokenizer, prompts, 16, names
        )
    assert decoder_for(model) is None


def test_evaluation_halves_its_batches_when_memory_runs_out() -> None:
    from workers.training.evaluation import in_chunks

    sizes: list[int] = []

    def run(chunk: list[int]) -> list[int]:
        sizes.append(len(chunk))
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [x * 2 for x in chunk]

    assert in_chunks(run, list(range(10)), 16) == [x * 2 for x in range(10)]
    assert sizes == [10, 8, 4, 2, 2, 2, 2, 2]


def test_step_tokens_are_sized_per_rank() -> None:
    """On N GPUs each rank's packed rows are sized to its own share of a step, not to the whole step."""
    from workers.training.distributed import Distributed
    from workers.training.steps import max_step_tokens

    lengths = [100] * 8 + [300] * 8
    whole = max_step_tokens(lengths, 8, 2, seed=0)
    halves = [max_step_tokens(lengths, 8, 2, 0, Distributed(rank, 2, "cpu").shard) for rank in (0, 1)]
    assert whole <= 8 * 300 and all(h < whole for h in halves)
    assert max(halves) <= 4 * 300  # a rank holds 4 of a step's 8 samples


def test_step_order_picks_balanced_or_shuffled_steps(tmp_path: Path, builtin_model_cache: Path) -> None:
    """``step_order``: the job's steps balanced by tokens (the default) or left as shuffled, as the peers order them."""
    from transformers import AutoTokenizer

    from workers.training.distributed import SINGLE
    from workers.training.recipe import tokenized
    from workers.training.steps import epoch_order

    tokenizer = AutoTokenizer.from_pretrained(str(builtin_model_cache))
    for order, balanced in (("balanced", True), ("shuffled", False)):
        spec = _spec(tmp_path, builtin_model_cache, steps_examples=32, step_order=order, batch_size=8)
        batches, _ = tokenized(spec, tokenizer, Hooks(), SINGLE)
        assert batches.balanced is balanced
        assert epoch_order(batches.lengths, 8, spec.hp.seed, 0, balanced) != epoch_order(
            batches.lengths, 8, spec.hp.seed, 0, not balanced
        )
