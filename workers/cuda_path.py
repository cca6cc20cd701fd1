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
- **One row length per job.** Every packed row is padded to the largest step, rounded up to 256 tokens (the
  filler has its own positions and no loss), so attention kernels are planned once, in a warm-up pass before the
  loop, instead of once per row length.
- **sdpa attention** with the block-diagonal mask the packed position ids give (exact, ``tests/test_packing.py``).
  flex attention computes only the diagonal blocks and measured ~3% faster per step on the 7B shape, but its
  compilation took ~40 s per job on the H200, more than it saves on jobs of this size (docs/benchmarks.md).

Nothing here is imported on the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workers.packing import PackedBatch, pack_by_tokens, packed_loss

GIB = 2**30
# Memory kept free for the allocator's fragmentation, optimizer state of the LoRA weights and CUDA workspaces.
RESERVE_BYTES = 2 * GIB
USABLE_FRACTION = 0.85
# Saved activations per token and layer, in bf16 values: ~10 per hidden unit (norms, q/k/v, attention output,
# residuals) and 4 per MLP unit (gate, up, activation, product). 10*4096 + 4*11008 values x 2 bytes x 30 layers
# = 5.1 MB per token for the 7B shape, against 5.2 MB measured; 25% margin on top.
ACTIVATION_MARGIN = 1.25
ROW_MULTIPLE = 256  # packed rows are padded to a multiple of this (tensor-core friendly, few kernel shapes)
ATTENTION = "sdpa"


@dataclass(frozen=True)
class CudaPlan:
    micro_tokens: int  # token budget of one packed micro-batch
    row_tokens: int  # every packed row is padded to this length: one compiled attention kernel for the whole job
    gradient_checkpointing: bool
    fused_ce: Any  # a fused linear cross-entropy module (reduction="sum") or None
    free_gib: float

    def describe(self) -> str:
        return (
            f"packed micro-batches of up to {self.micro_tokens} tokens, "
            f"{'with' if self.gradient_checkpointing else 'no'} gradient checkpointing, "
            f"{ATTENTION} attention, "
            f"{'Liger fused linear cross-entropy' if self.fused_ce is not None else 'torch cross-entropy'}, "
            f"bf16 autocast ({self.free_gib:.1f} GiB free after loading)"
        )

    def pack(self, rows: list[tuple[list[int], list[int]]], pad_id: int) -> list[PackedBatch]:
        return pack_by_tokens(rows, self.micro_tokens, pad_to_multiple=self.row_tokens, pad_id=pad_id)

    def loss(self, model: Any, batch: PackedBatch, denominator: int) -> torch.Tensor:
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


def plan_cuda(model: Any, step_tokens: int, max_length: int, pad_id: int) -> CudaPlan:
    """Decide the CUDA path for this model and job (see the module docstring)."""
    fused_ce = liger_fused_ce()

    model.get_base_model().set_attn_implementation(ATTENTION)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    config = model.get_base_model().config
    micro_tokens, checkpointing = size_micro_batch(config, free, step_tokens, max_length, fused_ce is not None)
    if checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad through the recompute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plan = CudaPlan(micro_tokens, -(-micro_tokens // ROW_MULTIPLE) * ROW_MULTIPLE, checkpointing, fused_ce, free / GIB)
    # One training and one evaluation pass on a full-length row: the attention plans for the job's one row shape
    # are made here, outside the timed loop, and a row that does not fit fails now rather than mid-job.
    [batch] = plan.pack([([pad_id] * 8, [pad_id] * 8)], pad_id)
    plan.loss(model, batch, 1).backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        plan.loss(model, batch, 1)
    return plan
