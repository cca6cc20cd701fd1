"""The CUDA training path's choices, made once per job after the model is loaded.

On a GPU the worker trains padding-free packed rows (``workers.packing``) in bf16 autocast. What else pays off
depends on the model and the memory left after loading it, so it is decided here, up front, and reported in the
job's ``setup`` event:

- **Micro-batch size in tokens.** As many packed tokens per forward pass as the free memory holds, up to the
  optimizer step's samples (``micro_batch_size x max_length``): one big row per step keeps the GPU busy, while
  four ~180-token samples per pass leave it waiting on kernel launches (docs/benchmarks.md). The estimate of
  activation memory per token is measured on the 7B shape (~5.2 MB per token without checkpointing).
- **Gradient checkpointing** only when not even one ``max_length`` sample fits without it: recomputing the
  forward costs ~1/3 more compute.
- **Fused linear cross-entropy** (Liger) when importable: the ``T x vocab`` logits are never materialised
  (~1 MB per token in fp32 for a 102k vocabulary) and it is ~10% faster.
- **flex attention** when it compiles here: it computes only the diagonal blocks of the packed mask; otherwise
  sdpa with the dense block-diagonal mask (exact either way, ``tests/test_packing.py``).

Nothing here is imported on the CPU path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workers.packing import pack, packed_loss

GIB = 2**30
# Memory kept free for the allocator's fragmentation, optimizer state of the LoRA weights and CUDA workspaces.
RESERVE_BYTES = 2 * GIB
USABLE_FRACTION = 0.85
# Saved activations per token and layer, in bf16 values: ~10 per hidden unit (norms, q/k/v, attention output,
# residuals) and 4 per MLP unit (gate, up, activation, product). 10*4096 + 4*11008 values x 2 bytes x 30 layers
# = 5.1 MB per token for the 7B shape, against 5.2 MB measured; 25% margin on top.
ACTIVATION_MARGIN = 1.25


@dataclass(frozen=True)
class CudaPlan:
    micro_tokens: int  # token budget of one packed micro-batch
    gradient_checkpointing: bool
    attention: str
    fused_ce: Any  # a fused linear cross-entropy module (reduction="sum") or None
    free_gib: float

    def describe(self) -> str:
        return (
            f"packed micro-batches of up to {self.micro_tokens} tokens, "
            f"{'with' if self.gradient_checkpointing else 'no'} gradient checkpointing, "
            f"{self.attention} attention, "
            f"{'Liger fused linear cross-entropy' if self.fused_ce is not None else 'torch cross-entropy'}, "
            f"bf16 autocast ({self.free_gib:.1f} GiB free after loading)"
        )

    def loss(self, model: Any, batch: Any, denominator: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return packed_loss(model, batch, "cuda", denominator, self.fused_ce)


def bytes_per_token(config: Any, checkpointing: bool, fused_ce: bool) -> float:
    """Activation memory of one packed token during forward+backward, estimated from the model's shape."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    per_layer = 2 * (10 * hidden + 4 * intermediate)
    # With checkpointing only each layer's input is kept, plus one layer recomputed at a time.
    activations = (2 * hidden * layers + per_layer) if checkpointing else per_layer * layers
    logits = 0 if fused_ce else 10 * config.vocab_size  # fp32 logits, their bf16 copy and the gradient
    return ACTIVATION_MARGIN * (activations + logits)


def size_micro_batch(
    config: Any, free_bytes: int, step_tokens: int, max_length: int, fused_ce: bool
) -> tuple[int, bool]:
    """(tokens per micro-batch, gradient checkpointing?) for the memory that is free."""
    usable = max(free_bytes * USABLE_FRACTION - RESERVE_BYTES, 0)
    fits = int(usable // bytes_per_token(config, False, fused_ce))
    if fits >= max_length:
        return min(step_tokens, fits), False
    fits = int(usable // bytes_per_token(config, True, fused_ce))
    return max(min(step_tokens, fits), max_length), True  # the OOM fallback (workers.retry) takes it from here


def liger_fused_ce() -> Any:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def pick_attention(model: Any, probe: Callable[[], None]) -> str:
    """flex attention if a packed forward compiles and runs with it here, else sdpa."""
    import torch._dynamo

    # flex attention compiles once per row length; rows are rounded up to 256 tokens, which still gives more
    # lengths in a job than dynamo's default limit of 8, after which it would silently run uncompiled.
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    base = model.get_base_model()
    try:
        base.set_attn_implementation("flex_attention")
        probe()
        return "flex_attention"
    except Exception:  # noqa: BLE001 - no triton, an old torch, an unsupported model: sdpa is exact too
        base.set_attn_implementation("sdpa")
        return "sdpa"


def plan_cuda(model: Any, step_tokens: int, max_length: int, pad_id: int) -> CudaPlan:
    """Decide the CUDA path for this model and job (see the module docstring)."""
    fused_ce = liger_fused_ce()

    @torch.no_grad()
    def probe() -> None:  # compiles the first row length outside the timed loop, too
        batch = pack([([pad_id] * 8, [pad_id] * 8)], pad_to_multiple=256, pad_id=pad_id)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            packed_loss(model, batch, "cuda", 1, fused_ce)

    attention = pick_attention(model, probe)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    config = model.get_base_model().config
    micro_tokens, checkpointing = size_micro_batch(config, free, step_tokens, max_length, fused_ce is not None)
    if checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad through the recompute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return CudaPlan(micro_tokens, checkpointing, attention, fused_ce, free / GIB)
