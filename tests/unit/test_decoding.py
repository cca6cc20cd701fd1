"""Graph decoding decodes as ``model.generate`` does: the same greedy tokens for a left-padded batch, rows that end
early padded, and the same stop. The CUDA graph itself runs on the GPU machine (bench/analyze_gpu.py); here the step it
records runs eagerly, with the same static cache and the same tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from service.llm.decoding import GraphDecoder, attach, decoder_for
from service.llm.scoring import build_prompts, generate, generate_stream, left_padded
from tests.unit.test_scoring import TEXTS


@pytest.fixture(scope="module")
def model_and_tokenizer(builtin_model_cache: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(builtin_model_cache)
    return model.eval(), AutoTokenizer.from_pretrained(builtin_model_cache)


@pytest.mark.parametrize("eos_at", [None, 5])
def test_tokens_equal_generate(model_and_tokenizer: tuple[Any, Any], eos_at: int | None) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = build_prompts(model, tokenizer, TEXTS)  # three lengths: the batch is left-padded
    batch = left_padded(tokenizer, prompts, "cpu")
    with torch.no_grad():
        plain = model.generate(
            **batch,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[:, batch["input_ids"].shape[1] :]
        eos = tokenizer.eos_token_id
        if eos_at is not None:  # a token the first row produces early ends that row, as if it were end-of-sequence
            eos = int(plain[0, eos_at])
            plain = model.generate(
                **batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos
            )[:, batch["input_ids"].shape[1] :]
        decoder = GraphDecoder(model, [eos], tokenizer.pad_token_id, graphs=False)
        for _ in range(2):  # the second call reuses the first one's cache: nothing of it may leak
            tokens = decoder.generate(batch["input_ids"], batch["attention_mask"], 12)
            assert tokens is not None
            assert tokens.tolist() == plain.tolist()
    if eos_at is not None:
        assert (plain[0, eos_at + 1 :] == tokenizer.pad_token_id).all()  # the row that ended is padded


def test_attached_decoder_serves_generate_and_stream(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = build_prompts(model, tokenizer, TEXTS)
    with torch.no_grad():
        before = generate(model, tokenizer, prompts, 10)
        streamed_before: list[str] = []
        generate_stream(model, tokenizer, prompts[0], 10, streamed_before.append)
        decoder = GraphDecoder(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, graphs=False)
        attach(model, decoder)
        try:
            calls: list[int] = []
            original = decoder.generate
            decoder.generate = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
            assert generate(model, tokenizer, prompts, 10) == before
            streamed: list[str] = []
            assert generate_stream(model, tokenizer, prompts[0], 10, streamed.append) == 10
            assert streamed == streamed_before
            assert len(calls) == 2
        finally:
            attach(model, None)
    assert decoder_for(model) is None


def test_an_attached_decoder_does_not_keep_its_model_alive(builtin_model_cache: Path) -> None:
    """A dropped merged copy must free its memory: the registry holds the model weakly, and so does its decoder."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin_model_cache)
    attach(model, GraphDecoder(model, [0], 0, graphs=False))
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_a_peft_model_gets_a_graph_per_set_of_active_adapters(builtin_model_cache: Path) -> None:
    """A captured step replays the LoRA weights active when it was captured: switching adapters must capture (and
    later replay) another graph, never the first one. Here a stand-in "graph" checks that, and runs the step."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.llm.decoding import active_adapters
    from service.llm.scoring import BASE, adapter_active

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_cache)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # random
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_cache), lora, adapter_name="a")
    model.add_adapter("b", lora)
    model.eval()
    decoder = GraphDecoder(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    captured: list[Any] = []

    def capture(step: Any) -> Any:
        variant = active_adapters(model)
        captured.append(variant)

        def replay() -> None:
            assert active_adapters(model) == variant, "a graph replayed with other adapters active"
            decoder._advance(step)

        return SimpleNamespace(replay=replay)

    decoder._capture = capture  # type: ignore[method-assign]
    batch = left_padded(tokenizer, build_prompts(model, tokenizer, TEXTS[:2]), "cpu")
    outputs = {}
    with torch.no_grad():
        for name in ["a", "b", BASE, "a"]:
            with adapter_active(model, name):
                plain = model.generate(
                    **batch,
                    max_new_tokens=8,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )[:, batch["input_ids"].shape[1] :]
                tokens = decoder.generate(batch["input_ids"], batch["attention_mask"], 8)
                assert tokens is not None and tokens.tolist() == plain.tolist()
                outputs[name] = tokens.tolist()
    assert captured == [(False, ("a",)), (False, ("b",)), (True, ())]  # "a" again replays its own graph
    assert len({str(v) for v in outputs.values()}) == 3  # the adapters do change the tokens
