"""The CUDA plan's choices for the card it runs on, without a GPU: a faked T4 (sm75) gets fp16 with loss scaling and
the exact masked attention instead of flash varlen, a faked A100 (sm80) bf16; the graphed sdpa stack is exact; an
fp16 step whose gradients overflow is skipped and reported (workers/training/cuda/plan.py, service/llm/modeling.py,
workers/training/recipe.py)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from service.llm.modeling import keep_bitsandbytes_out, pick_compute_dtype, plan_load
from workers.training import recipe
from workers.training.cuda import plan as cuda_plan
from workers.training.cuda.graphs import DecoderStack, block_causal_bias
from workers.training.cuda.plan import Compute, CudaPlan, set_attention, varlen_available
from workers.training.distributed import SINGLE
from workers.training.packing import pack


def fake_card(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    """torch.cuda as on a card of this compute capability (bf16 native from sm80)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability >= (8, 0))


def test_t4_gets_fp16_and_loss_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_card(monkeypatch, (7, 5))
    dtype, why = pick_compute_dtype("auto")
    assert dtype == torch.float16 and "sm75 has no native bf16" in why
    plan = plan_load("cuda", "auto")
    assert (plan.quantization, plan.dtype, plan.dtype_name, plan.loss_scaling) == ("nf4", torch.float16, "fp16", True)
    assert "fp16 compute" in plan.reason and "dynamic loss scaling" in plan.reason and "float32 LoRA" in plan.reason
    assert plan_load("cuda", "none").dtype == torch.float16  # an unquantised base in fp16 too


@pytest.mark.parametrize("card", [(8, 0), (9, 0)])
def test_ampere_and_newer_get_bf16(monkeypatch: pytest.MonkeyPatch, card: tuple[int, int]) -> None:
    fake_card(monkeypatch, card)
    plan = plan_load("cuda", "auto")
    assert (plan.dtype, plan.loss_scaling) == (torch.bfloat16, False)
    assert f"bf16 compute (native on sm{card[0]}{card[1]})" in plan.reason


def test_settings_override_the_card(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_card(monkeypatch, (9, 0))
    assert pick_compute_dtype("float16")[0] == torch.float16
    assert pick_compute_dtype("auto", capability="7.5") == (
        torch.float16,
        "fp16 compute (sm75 (FLASHTUNE_CUDA_CAPABILITY) has no native bf16)",
    )
    fake_card(monkeypatch, (7, 0))
    assert pick_compute_dtype("bfloat16") == (torch.bfloat16, "bf16 compute (FLASHTUNE_COMPUTE_DTYPE=bfloat16)")
    with pytest.raises(ValueError, match="compute dtype"):
        pick_compute_dtype("float8")


def test_the_cpu_plan_is_float32_and_keeps_bitsandbytes_out() -> None:
    assert plan_load("cpu", "auto").dtype == torch.float32
    table: dict[str, Any] = {}
    assert keep_bitsandbytes_out(table) and table == {"bitsandbytes": None}  # `import bitsandbytes` now fails
    assert not keep_bitsandbytes_out({"bitsandbytes": object()})  # a process that has it already keeps it


def test_no_varlen_below_sm80_and_the_event_says_why() -> None:
    from tests.unit.test_packing import tiny_llama

    assert not varlen_available((7, 5))  # decided from the capability: no CUDA call
    base = tiny_llama("eager")
    attention, note = set_attention(base, varlen=True, compute=Compute(torch.float16, (7, 5)))
    assert attention == "sdpa" and base.config._attn_implementation == "sdpa"
    assert "flash-attention varlen needs sm80, planned for sm75" in note


def test_the_fp16_plan_describes_itself() -> None:
    plan = CudaPlan(
        micro_tokens=2688,
        row_multiple=2688,
        attention="sdpa",
        gradient_checkpointing=False,
        fused_ce=None,
        fused_layers=False,
        free_gib=9.5,
        dtype=torch.float16,
        scaler=object(),
        capability=(7, 5),
        attention_note="flash-attention varlen needs sm80",
        fallbacks=("Liger kernels off, torch layers and cross-entropy instead: no C compiler",),
        graphs_note="turned off",
        warm_memory_gib=(12.961, 14.09),
    )
    text = plan.describe()
    assert "fp16 autocast with dynamic loss scaling on sm75" in text and "no C compiler" in text
    assert "12.96 GiB peak allocated, 14.09 reserved" in text
    summary = plan.summary()
    assert (summary["warm_up_peak_gib"], summary["warm_up_reserved_gib"]) == (12.96, 14.09)
    assert summary["compute_dtype"] == "fp16" and summary["loss_scaling"] and summary["capability"] == "7.5"
    assert summary["fallbacks"] == ["Liger kernels off, torch layers and cross-entropy instead: no C compiler"]


def test_liger_that_fails_to_warm_up_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_plan, "liger_fused_ce", lambda: object())
    monkeypatch.setattr(cuda_plan, "liger_problem", lambda dtype: "a Liger kernel failed to warm up: no C compiler")
    fused_ce, layers, notes = cuda_plan._liger(object(), torch.float16, True)
    assert fused_ce is None and layers is False and "no C compiler" in notes[0]
    monkeypatch.setattr(cuda_plan, "liger_fused_ce", lambda: None)  # not installed: nothing to report
    assert cuda_plan._liger(object(), torch.float16, True) == (None, False, ())


def test_block_causal_bias_confines_each_segment() -> None:
    bounds = torch.tensor([0, 3, 5, 8, 8, 8], dtype=torch.int32)  # segments 3, 2, 3 and two empty ones
    bias = block_causal_bias(bounds, 8, torch.float16)[0, 0]
    segment = [0, 0, 0, 1, 1, 2, 2, 2]
    expected = torch.tensor([[segment[i] == segment[j] and j <= i for j in range(8)] for i in range(8)])
    assert torch.equal(bias == 0, expected)
    assert bool((bias[~expected] == torch.finfo(torch.float16).min).all())


def test_the_graphed_sdpa_stack_is_exact() -> None:
    """The stack graphed on sm70/75 (sdpa, mask built from the boundaries) gives each sample's own hidden states."""
    from tests.unit.test_packing import rows, tiny_llama

    lm = tiny_llama("sdpa")
    inner = lm.model
    batch = pack(rows(), pad_to_multiple=8)
    stack = DecoderStack(inner.layers, batch.num_tokens, "sdpa")
    with torch.no_grad():
        hidden = inner.embed_tokens(batch.input_ids)
        cos, sin = inner.rotary_emb(hidden, batch.position_ids)
        packed = inner.norm(stack(hidden, cos, sin, torch.tensor(batch.bounds(6), dtype=torch.int32)))[0]
        start = 0
        for ids, _ in rows():
            expected = inner(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
            torch.testing.assert_close(packed[start : start + len(ids)], expected, atol=1e-5, rtol=1e-4)
            start += len(ids)


class _Hooks:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def on_event(self, type: str, message: str, data: dict[str, Any]) -> None:
        self.events.append((type, message, data))


def test_an_overflowing_fp16_step_is_skipped_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss scaling as the fp16 plan runs it (here on the CPU): a step whose scaled gradients overflow changes no
    weight and no learning rate, halves the scale and leaves a ``skipped_step`` event; the next step trains."""
    weight = torch.nn.Parameter(torch.ones(4))
    losses = iter([weight.sum() * float("inf"), weight.sum()])  # the first step's gradients overflow
    monkeypatch.setattr(recipe, "step_loss", lambda model, batch, device, denominator: next(losses))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    hooks = _Hooks()
    run: Any = SimpleNamespace(
        dist=SINGLE,
        device="cpu",
        model=None,
        trainable=[weight],
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu", init_scale=1024.0),
        keeps_grads=False,
        skipped_steps=0,
        history={},  # the skipped-step count rides in it (checkpointed, 7826d13)
        hooks=hooks,
    )
    batch = SimpleNamespace(num_target_tokens=4, num_tokens=4)
    _, _, overflowed = recipe.optimizer_step(run, [batch])  # type: ignore[list-item]
    assert overflowed is not None and bool(overflowed)
    recipe._report_skipped(run, 1)
    assert torch.equal(weight.detach(), torch.ones(4)) and scheduler.last_epoch == 0
    assert hooks.events == [
        ("skipped_step", "step 1 skipped: fp16 gradients overflowed; the loss scale is now 512", hooks.events[0][2])
    ]
    assert hooks.events[0][2] == {"step": 1, "loss_scale": 512.0, "skipped_steps": 1}
    assert run.history["skipped_steps"] == [1]
    _, _, overflowed = recipe.optimizer_step(run, [batch])  # type: ignore[list-item]
    assert overflowed is not None and not bool(overflowed)
    assert not torch.equal(weight.detach(), torch.ones(4))


def test_lora_weights_stay_float32_on_an_fp16_base() -> None:
    from service.jobs.hyperparameters import Hyperparameters, resolve
    from tests.unit.test_packing import tiny_llama

    base = tiny_llama("sdpa").to(torch.float16)
    hp = resolve(Hyperparameters(), "some/model")  # the user's recipe: LoRA on q_proj and v_proj
    model = recipe.attach_lora(base, hp, plan_load("cpu", "none"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float16


def test_released_graphs_are_gone() -> None:
    """After the last training pass the graphs (and their memory pools) go before the evaluation."""
    from workers.training.cuda.graphs import GraphedDecoder

    graphed = GraphedDecoder(lm=None, stack=object(), row_tokens=8, max_segments=2, forward_only=None)
    graphed.release()
    assert graphed.stack is None and graphed.forward_only is None
    with pytest.raises(ValueError, match="released"):
        graphed.hidden(pack([([1, 2, 3], [1, 2, 3])], pad_to_multiple=8))


class _LigerFunction:
    """Liger's fused linear cross-entropy function as far as ChunkedLinearCE uses it: the signature (0.8.5's), the
    rows per chunk it would pick, and the loss (torch's, on real tensors)."""

    chunks: list[int] = []

    @staticmethod
    def forward(  # noqa: PLR0913 - Liger's signature
        ctx: Any,
        _input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: Any = None,
        ce_weight: Any = None,
        ignore_index: int = -100,
        lse_square_scale: float = 0.0,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        softcap: Any = None,
        return_z_loss: bool = False,
        accum_dtype: Any = None,
        use_token_scaling: bool = False,
        return_token_accuracy: bool = False,
        return_predicted_tokens: bool = False,
        ce_impl: Any = None,
        ce_mode: Any = None,
        chunk_mem_const: int = 1,
    ) -> Any:
        raise NotImplementedError  # only apply() is called

    @classmethod
    def apply(cls, *args: Any) -> tuple[torch.Tensor, None, None, None]:
        named = dict(zip(list(inspect.signature(cls.forward).parameters)[1:], args, strict=True))
        (tokens, width), vocabulary = named["_input"].shape, named["weight"].shape[0]
        splits = -(-vocabulary // (named["chunk_mem_const"] * width))
        cls.chunks.append(min(1 << (-(-tokens // splits) - 1).bit_length(), tokens))  # Liger's chunk size
        logits = named["_input"] @ named["weight"].T
        loss = torch.nn.functional.cross_entropy(
            logits, named["target"], ignore_index=named["ignore_index"], reduction=named["reduction"]
        )
        return loss, None, None, None


@pytest.mark.parametrize("tokens", [300, 512, 1500, 2432, 5000])
def test_the_fused_cross_entropy_takes_rows_in_chunks_of_512(tokens: int) -> None:
    from workers.training.cuda.plan import FUSED_CE_CHUNK_ROWS, ChunkedLinearCE

    ce = ChunkedLinearCE(_LigerFunction, FUSED_CE_CHUNK_ROWS)
    _LigerFunction.chunks.clear()
    meta = {"device": "meta"}  # the 7B shape's sizes, no memory
    ce(
        torch.empty(102400, 4096, **meta),
        torch.empty(tokens, 4096, **meta),
        torch.empty(tokens, dtype=torch.long, **meta),
    )
    assert _LigerFunction.chunks == [min(tokens, FUSED_CE_CHUNK_ROWS)]


def test_the_fused_cross_entropy_is_summed() -> None:
    from workers.training.cuda.plan import ChunkedLinearCE

    torch.manual_seed(0)
    weight, hidden = torch.randn(50, 8), torch.randn(6, 8)
    targets = torch.tensor([1, 2, 3, -100, 4, 5])
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(ChunkedLinearCE(_LigerFunction, 512)(weight, hidden, targets), expected)
