"""service.serving.gathered_lora: a mixed-adapter batch with every adapter's LoRA delta gathered into one batched
computation per layer answers as peft's own loop over the adapters, and nothing else changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from service.serving.gathered_lora import BASE, GatheredLoRA

# adapters of different ranks, scalings and target modules (one with dropout, inert in eval mode)
ADAPTERS: dict[str, dict[str, Any]] = {
    "news": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    "macro": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
    "earnings": {"r": 4, "lora_alpha": 16, "target_modules": ["v_proj", "gate_proj"], "lora_dropout": 0.1},
    "credit": {"r": 3, "lora_alpha": 3, "target_modules": ["q_proj", "up_proj"]},
}
ROWS = ["news", "macro", BASE, "earnings", "credit", "macro", "news", "earnings"]


@pytest.fixture(scope="module")
def peft_model(builtin_model_cache: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(builtin_model_cache)
    model = None
    for name, options in ADAPTERS.items():
        config = LoraConfig(init_lora_weights=False, **options)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    assert model is not None
    return model.eval()


def _inputs(rows: int) -> torch.Tensor:
    return torch.randint(3, 600, (rows, 11), generator=torch.Generator().manual_seed(rows))


def _logits(model: Any, ids: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    extra = {} if names is None else {"adapter_names": list(names)}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits.float()


def test_mixed_batch_equals_peft(peft_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits of a mixed batch (four adapters of ranks 2-8 on different modules, and the base) as peft's loop."""
    from peft.tuners.lora.layer import Linear

    ids = _inputs(len(ROWS))
    expected = _logits(peft_model, ids, ROWS)
    gathered = GatheredLoRA(peft_model, list(ADAPTERS))
    assert len(gathered.layers) == 2 * 6  # q, v, o, gate, up, down of both layers: each held by some adapter
    gathered.install()
    try:

        def refused(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("peft's mixed-batch loop ran")

        monkeypatch.setattr(Linear, "_mixed_batch_forward", refused)
        got = _logits(peft_model, ids, ROWS)
    finally:
        monkeypatch.undo()
        gathered.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not any("_mixed_batch_forward" in vars(m) for m in peft_model.modules())  # peft's own again


def test_each_row_as_its_adapter_alone(peft_model: Any) -> None:
    """Each row of a gathered mixed batch equals that row run with its adapter alone (the base: adapters off)."""
    from service.llm.scoring import adapter_active

    ids = _inputs(len(ROWS))
    gathered = GatheredLoRA(peft_model, list(ADAPTERS))
    gathered.install()
    try:
        mixed = _logits(peft_model, ids, ROWS)
    finally:
        gathered.remove()
    for i, name in enumerate(ROWS):
        with adapter_active(peft_model, name):
            alone = _logits(peft_model, ids[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_single_adapter_batch_untouched(peft_model: Any) -> None:
    """A batch of one adapter (no adapter_names) never reaches the gathered path and answers bit for bit as before."""
    ids = _inputs(4)
    peft_model.set_adapter("macro")
    before = _logits(peft_model, ids)
    gathered = GatheredLoRA(peft_model, list(ADAPTERS))
    gathered.install()
    calls: list[list[str]] = []
    original = gathered.rows

    def counted(names: list[str], device: torch.device) -> torch.Tensor | None:
        calls.append(names)
        return original(names, device)

    gathered.rows = counted  # type: ignore[method-assign]
    try:
        after = _logits(peft_model, ids)
    finally:
        gathered.remove()
        peft_model.set_adapter("news")
    assert torch.equal(before, after)
    assert calls == []


def test_an_unknown_row_falls_back_to_peft(peft_model: Any) -> None:
    """Stacks of only some of the adapters: a batch naming another one runs peft's loop, with the same answer."""
    ids = _inputs(3)
    names = ["news", "credit", BASE]
    expected = _logits(peft_model, ids, names)
    gathered = GatheredLoRA(peft_model, ["news", "macro"])
    gathered.install()
    try:
        got = _logits(peft_model, ids, names)
    finally:
        gathered.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16_within_bf16_tolerance(builtin_model_cache: Path) -> None:
    """In bf16 (the served dtype on CUDA) the gathered batch stays within bf16 rounding of peft's loop."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(builtin_model_cache, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model = model.to(torch.bfloat16).eval()
    names = ["default", "other", BASE, "other"]
    ids = _inputs(len(names))
    expected = _logits(model, ids, names)
    gathered = GatheredLoRA(model, ["default", "other"])
    gathered.install()
    try:
        got = _logits(model, ids, names)
    finally:
        gathered.remove()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_engine_mixed_batch_runs_gathered(
    builtin_model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through ModelServer: a micro-batch of three saved adapters (ranks 2, 6, 4) and the base runs gathered (peft's
    loop refused) and answers as with FLASHTUNE_GATHERED_LORA=false."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear
    from transformers import AutoModelForCausalLM

    from service.core.config import Settings
    from service.core.layout import AdapterRef, adapter_name
    from service.serving.engine import Item, ModelServer

    settings = Settings(data_dir=tmp_path, base_model=str(builtin_model_cache), device="cpu", gathered_lora=False)
    refs: list[AdapterRef | None] = []
    for i, rank in enumerate((2, 6, 4)):
        torch.manual_seed(i)
        config = LoraConfig(r=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        folder = settings.layout.adapters / adapter_name(i + 1)
        get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_cache), config).save_pretrained(str(folder))
        refs.append(AdapterRef(folder.name, folder))
    texts = ["Fed raises rates by 50 bp", "央行降准0.5个百分点", "Company X beats earnings", "Oil falls 5%"]
    items = [Item(text, ref) for text, ref in zip(texts, [*refs, None], strict=True)]
    server = ModelServer(settings)
    try:
        peft_answers = [a.summary() for a in server.analyze_items(items, 0)]
        settings.gathered_lora = True

        def refused(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("peft's mixed-batch loop ran")

        monkeypatch.setattr(Linear, "_mixed_batch_forward", refused)
        gathered = server.analyze_items(items, 0)
    finally:
        monkeypatch.undo()
        server.release()
    assert {a.batch_size for a in gathered} == {len(items)}  # one mixed pass
    for a, b in zip((a.summary() for a in gathered), peft_answers, strict=True):
        assert a["label"] == b["label"] and a["importance"] == b["importance"]
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)
