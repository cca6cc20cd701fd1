"""The CUDA training path's choices, made once per job after the model is loaded.

On a GPU the worker trains padding-free packed rows (``workers.training.packing``) under autocast in the load plan's
compute dtype (``service.llm.modeling.pick_compute_dtype``). What else pays off depends on the card, the model and
the memory left after loading it, so it is decided here, up front, and reported in the job's ``cuda_plan`` event:

- **bf16 or fp16.** bf16 where the card has it natively (sm80+). On a T4 (sm75) or V100 (sm70) the activations and
  the NF4 compute are fp16, the LoRA weights stay float32, and the loss is scaled dynamically
  (``torch.amp.GradScaler``): gradients are computed on the loss times a scale, unscaled before clipping, and a step
  whose gradients overflowed is skipped (the scale halves; the recipe reports each skipped step as an event), the
  scale doubling again after 2,000 clean steps. Everything else below works on sm70/75 too, except the
  flash-attention varlen kernel, which the plan replaces by sdpa with the exact block-diagonal mask.

- **Micro-batch size in tokens.** As many packed tokens per forward pass as the free memory holds, up to the
  optimizer step's samples (``micro_batch_size x max_length``): one big row per step keeps the GPU busy, while
  four ~180-token samples per pass leave it waiting on kernel launches (docs/benchmarks.md). The activation memory
  per token is counted from the model's shape, its layer kernels and its LoRA modules (:func:`bytes_per_token`:
  5.2 MB per token measured on the 7B shape with transformers' layers; with Liger's and q/v LoRA 3.5 MB counted and
  3.5-3.6 measured, docs/benchmarks.md, session 14). The ``cuda_plan`` event reports the peak allocated and reserved
  memory after the warm-up pass, so a plan can be checked against its cap. Where a step needs several
  micro-batches, they are balanced (``workers.training.packing.pack_by_tokens``) and the row every micro-batch is
  padded to is only as long as balancing needs (:func:`balanced_row`).
- **Gradient checkpointing** only when not even one ``max_length`` sample fits without it: recomputing the
  forward costs ~1/3 more compute.
- **Fused linear cross-entropy** (Liger) when importable and its kernels warm up: the ``T x vocab`` logits are never
  materialised (~1 MB per token in fp32 for a 102k vocabulary) and it is ~10% faster. It runs on the positions
  that have a target only (``workers.training.packing.packed_loss``), 512 of them at a time
  (:class:`ChunkedLinearCE`).
- **Liger's RMSNorm, RoPE and SwiGLU kernels** when importable (Llama-family models): one fused kernel where
  transformers launches five to ten. They cut GPU work; their Triton launches cost more host time than
  transformers' kernels, which only CUDA graphs (below) take off the step (docs/benchmarks.md). Liger's Triton
  kernels are compiled on first use, which needs a C compiler and Python's headers: where a tiny warm-up of each
  fails (``service.llm.modeling.liger_problem``), the job runs on torch's own layers and cross-entropy instead,
  and its ``cuda_plan`` and ``fallback`` events say why.
- **Attention confined to each sample.** On GPUs with flash attention (sm80+) torch's varlen kernel takes the
  samples' boundaries (``workers.training.packing.varlen_attention``): only each sample's own causal triangle is
  computed. Elsewhere sdpa with the block-diagonal mask the packed position ids give (exact,
  ``tests/unit/test_packing.py``); there every row is padded to one length per job, rounded up to 64 tokens (the filler
  has its own positions and no loss), so cuDNN plans its attention once, in the warm-up pass, not once per row
  length. flex attention was measured too: ~3% faster per step than sdpa, but ~40 s of compilation per job.
- **CUDA graphs** for the decoder layers when no checkpointing is needed (``workers.training.cuda.graphs``; with
  varlen or with sdpa and the packed mask built on the GPU): the eager loop is bound by kernel launches, not by the
  GPU. Every row is then padded to the job's one length. The validation loss at each epoch's end replays a
  forward-only graph.
- **Each NF4 weight dequantised once for the job** when memory allows: bitsandbytes dequantises a 4-bit weight in
  every forward pass and again in its backward pass (for the input's gradient), ~7 ms each per step on the 7B
  shape. Where the bf16 copies of the weights (~12 GiB on the 7B shape) fit beside the micro-batch the plan chose
  anyway, each layer multiplies by a copy made once (``service.llm.nf4.use_dense_copies``), in training and in the
  evaluation after it. A pass that kept its forward's copies for the backward (this plan until session 15, measured
  +6% steady tokens/s) held them all at once at its peak, so copies kept for the job raise no peak.
- **A memory cap** (``FLASHTUNE_GPU_MEMORY_GIB``): the plan sizes itself to the cap instead of the free memory and
  the process is held to it, so a job fits a smaller card or shares one.

``CudaOptions`` (``workers.training.spec``, carried by the ``TrainingSpec``) can turn varlen attention, the Liger
layer kernels, the kept dequantised weights and the graphs off and set the rows' rounding; the worker uses the
defaults, the GPU benchmark (``bench/train_gpu.py``) the others, to measure what each piece is worth.
``FLASHTUNE_CUDA_CAPABILITY`` (the spec's ``cuda_capability``) plans as on another card: ``7.5`` on an H100 gives the
T4's plan (fp16, no varlen), which is how that path is measured without a T4 (docs/benchmarks.md).

Nothing here is imported on the CPU path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from service.llm.modeling import DTYPE_NAMES, cap_gpu_memory, fuse_layers, liger_problem
from service.llm.nf4 import dequantized_bytes, nf4_layers, use_dense_copies
from workers.training.cuda.graphs import GraphedDecoder, capture
from workers.training.packing import VARLEN, PackedBatch, pack_by_tokens, packed_loss, register_varlen_attention
from workers.training.spec import CudaOptions

GIB = 2**30
# Memory kept free for the allocator's cache, CUDA workspaces and the graphs' pools, and the margin over the counted
# activations (bytes_per_token). Session 14 (H100, 7B shape, docs/benchmarks.md) measured 3.5-3.6 MB a token with
# q/v LoRA at rows of 1,466 and 2,432 tokens (counted 3.53) and 5.9 with all-linear at 1,466 (counted 6.0), ~0.4 GiB
# above the loaded model besides, and the reserved memory after the warm-up pass ~1.1 GiB above the peak allocated:
# with these values a 15 GiB cap plans one row of 2,432 tokens a step, which peaked at 12.96 GiB allocated and 14.99
# reserved, at full speed.
RESERVE_BYTES = 2**30
USABLE_FRACTION = 0.95
ACTIVATION_MARGIN = 1.05
VARLEN_ROW_MULTIPLE = 8  # varlen: no plans to make; a multiple of 8 keeps matrix shapes tensor-core friendly
FUSED_CE_CHUNK_ROWS = 512  # rows of logits the fused cross-entropy computes at a time (ChunkedLinearCE)


@dataclass(frozen=True)
class CudaPlan:
    micro_tokens: int  # token budget of one packed micro-batch
    row_multiple: int  # packed rows are padded to a multiple of this
    attention: str  # "varlen" or "sdpa"
    gradient_checkpointing: bool
    fused_ce: Any  # a fused linear cross-entropy module (reduction="sum") or None
    fused_layers: bool  # Liger RMSNorm/RoPE/SwiGLU
    free_gib: float  # memory the plan was sized for (free after loading, or the cap's share)
    graphed: GraphedDecoder | None = None  # the decoder layers as CUDA graphs (training and validation passes)
    graphs_note: str = ""  # why there are no graphs, when there are none
    kept_dequantized: int = 0  # NF4 layers that multiply by a dense copy of their weight, made once
    dtype: torch.dtype = torch.bfloat16  # the autocast dtype of every pass
    scaler: Any = None  # fp16: the torch.amp.GradScaler of the job's optimizer steps
    capability: tuple[int, int] = (9, 0)  # the compute capability the plan was made for
    attention_note: str = ""  # why not varlen, when not
    fallbacks: tuple[str, ...] = ()  # fused pieces that failed to warm up, and what runs instead
    warm_memory_gib: tuple[float, float] = (0.0, 0.0)  # peak allocated and reserved after the warm-up pass

    def describe(self) -> str:
        scaled = " with dynamic loss scaling" if self.scaler is not None else ""
        return (
            f"packed micro-batches of up to {self.micro_tokens} tokens, "
            f"{'with' if self.gradient_checkpointing else 'no'} gradient checkpointing, "
            f"{self.attention} attention{f' ({self.attention_note})' if self.attention_note else ''}, "
            f"{'Liger fused linear cross-entropy' if self.fused_ce is not None else 'torch cross-entropy'}, "
            f"{'Liger RMSNorm/RoPE/SwiGLU, ' if self.fused_layers else ''}"
            f"{self._graphs_described()}, "
            f"{'NF4 weights dequantised once for the job, ' if self.kept_dequantized else ''}"
            f"{DTYPE_NAMES[self.dtype]} autocast{scaled} on sm{self.capability[0]}{self.capability[1]} "
            f"({self.free_gib:.1f} GiB for activations after loading; after the warm-up pass "
            f"{self.warm_memory_gib[0]:.2f} GiB peak allocated, {self.warm_memory_gib[1]:.2f} reserved)"
            + "".join(f"; {note}" for note in self.fallbacks)
        )

    def _graphs_described(self) -> str:
        if self.graphed is None:
            return f"eager ({self.graphs_note})"
        return "CUDA graphs" + ("" if self.graphed.forward_only is not None else " (validation loss eager)")

    def summary(self) -> dict[str, Any]:
        """The plan's choices as the ``cuda_plan`` event's data."""
        return {
            "micro_tokens": self.micro_tokens,
            "row_multiple": self.row_multiple,
            "attention": self.attention,
            "gradient_checkpointing": self.gradient_checkpointing,
            "fused_ce": self.fused_ce is not None,
            "fused_layers": self.fused_layers,
            "cuda_graphs": self.graphed is not None,
            "validation_graph": self.graphed is not None and self.graphed.forward_only is not None,
            "graphs_note": self.graphs_note,
            "free_gib": round(self.free_gib, 2),
            "kept_dequantized": self.kept_dequantized,
            "compute_dtype": DTYPE_NAMES[self.dtype],
            "loss_scaling": self.scaler is not None,
            "capability": f"{self.capability[0]}.{self.capability[1]}",
            "attention_note": self.attention_note,
            "fallbacks": list(self.fallbacks),
            "warm_up_peak_gib": round(self.warm_memory_gib[0], 2),
            "warm_up_reserved_gib": round(self.warm_memory_gib[1], 2),
        }

    def pack(self, rows: list[tuple[list[int], list[int]]], pad_id: int) -> list[PackedBatch]:
        return pack_by_tokens(rows, self.micro_tokens, pad_to_multiple=self.row_multiple, pad_id=pad_id)

    def loss(self, model: Any, batch: PackedBatch, denominator: int) -> torch.Tensor:
        """A packed row's loss: training rows replay the graphs; validation rows (eval mode, no gradients) replay
        the forward-only graph where they fit it; anything else runs eagerly."""
        with compute_autocast(self.dtype):
            hidden, graphed = None, self.graphed
            if graphed is not None and model.training and torch.is_grad_enabled():
                hidden = graphed.hidden(batch)
            elif (
                graphed is not None
                and not model.training
                and not torch.is_grad_enabled()
                and graphed.can_validate(batch)
            ):
                hidden = graphed.hidden(batch, training=False)
            return packed_loss(model, batch, "cuda", denominator, self.fused_ce, hidden)


def compute_autocast(dtype: torch.dtype = torch.bfloat16) -> torch.autocast:
    """The autocast of every CUDA training pass and of graph capture. No cast cache: a graph is captured under it,
    and a cached cast would outlive its input."""
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


def bytes_per_token(
    config: Any, checkpointing: bool, fused_ce: bool, *, fused_layers: bool = False, lora_bytes: float = 0.0
) -> float:
    """Activation memory of one packed token during forward+backward, estimated from the model's shape.

    Saved per layer, in bf16 values: with transformers' layers ~10 per hidden unit (norms, q/k/v, attention output,
    residuals) and 4 per MLP unit (gate, up, activation, product): 5.1 MB per token on the 7B shape, 5.2 measured.
    With Liger's (``fused_layers``) 6 per hidden unit (each RMSNorm's input, q/k/v and the attention output) and 2 per
    MLP unit (SwiGLU keeps gate and up): the frozen NF4 projections keep nothing. ``lora_bytes``: what one layer's
    LoRA modules keep on top (:func:`lora_saved_bytes`)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    values = (6 * hidden + 2 * intermediate) if fused_layers else (10 * hidden + 4 * intermediate)
    per_layer = 2 * values + lora_bytes
    # With checkpointing only each layer's input is kept, plus one layer recomputed at a time.
    activations = (2 * hidden * layers + per_layer) if checkpointing else per_layer * layers
    logits = 0 if fused_ce else 10 * config.vocab_size  # fp32 logits, their bf16 copy and the gradient
    return ACTIVATION_MARGIN * (activations + logits)


def lora_saved_bytes(model: Any, layers: int) -> float:
    """Bytes per token that one decoder layer's LoRA modules keep for their backward pass: each module the input its
    A matrix multiplies (bf16, 2 bytes a feature) and, with dropout, the dropout's mask (1 byte a feature). Summed
    over the model's LoRA modules and shared out over its ``layers``."""
    total = 0.0
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        dropouts = dict(getattr(module, "lora_dropout", {}))
        for name, linear in lora_a.items():
            dropout = dropouts.get(name)
            masked = isinstance(dropout, torch.nn.Dropout) and dropout.p > 0
            total += getattr(linear, "in_features", 0) * (3 if masked else 2)
    return total / max(layers, 1)


def size_micro_batch(
    config: Any,
    free_bytes: int,
    step_tokens: int,
    max_length: int,
    fused_ce: bool,
    *,
    fused_layers: bool = False,
    lora_bytes: float = 0.0,
) -> tuple[int, bool]:
    """(tokens per micro-batch, gradient checkpointing?) for the memory that is free; the fused cross-entropy's
    chunk of logits (:class:`ChunkedLinearCE`) is set aside first."""
    chunk = 2 * FUSED_CE_CHUNK_ROWS * config.vocab_size if fused_ce else 0
    usable = max(free_bytes * USABLE_FRACTION - RESERVE_BYTES - chunk, 0)

    def per_token(checkpointing: bool) -> float:
        return bytes_per_token(config, checkpointing, fused_ce, fused_layers=fused_layers, lora_bytes=lora_bytes)

    fits = int(usable // per_token(False))
    if fits >= max_length:
        return min(step_tokens, fits), False
    fits = int(usable // per_token(True))
    return max(min(step_tokens, fits), max_length), True  # the OOM fallback (workers.retry) takes it from here


def balanced_row(micro_tokens: int, step_tokens: int, longest: int) -> int:
    """The longest row a step of at most ``step_tokens`` tokens needs when split into as few balanced micro-batches
    of at most ``micro_tokens`` as its size allows: each gets the step's mean share plus at most one sample
    (``longest``: the job's longest sample), the bound of ``pack_by_tokens``' balancing."""
    count = -(-step_tokens // max(micro_tokens, 1))
    return min(micro_tokens, step_tokens, -(-step_tokens // count) + longest)


def liger_fused_ce() -> Any:
    """Liger's fused linear cross-entropy in chunks of :data:`FUSED_CE_CHUNK_ROWS` (:class:`ChunkedLinearCE`), or
    Liger's module as it comes where its function takes no chunk setting; None without liger-kernel."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    if "chunk_mem_const" in inspect.signature(LigerFusedLinearCrossEntropyFunction.forward).parameters:
        return ChunkedLinearCE(LigerFusedLinearCrossEntropyFunction, FUSED_CE_CHUNK_ROWS)
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


class ChunkedLinearCE:
    """Liger's fused linear cross-entropy (``reduction="sum"``) with chunks of about ``rows`` rows.

    Liger bounds each chunk's logits by the size of the hidden states: 128 rows at a time for the 7B shape's 102k
    vocabulary, each chunk reading the whole output embedding (0.84 GB) once for the logits and once for the hidden
    states' gradient. A step of 2,400 tokens read it 38 times, ~8 ms of ~122 on an H200 (session 15's profile,
    docs/benchmarks.md). Chunks of 512 rows are long enough for the multiplication to be bound by the GPU's compute,
    not by reading the weight, and take ``rows x vocabulary`` bf16 values (105 MB on the 7B shape), which the plan sets
    aside (:func:`size_micro_batch`). Called as ``fused_ce(weight, hidden, targets)``."""

    def __init__(self, function: Any, rows: int) -> None:
        self.function, self.rows = function, rows
        self._signature = inspect.signature(function.forward)

    def __call__(self, weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        (tokens, width), vocabulary = hidden.shape, weight.shape[0]
        # Liger cuts the rows into ceil(vocabulary / (chunk_mem_const x width)) pieces, each rounded up to a power of
        # 2 rows: at least ceil(tokens / rows) pieces keep a power-of-2 ``rows`` the bound (1: Liger's own chunks)
        chunk_mem_const = max(1, vocabulary // (width * -(-tokens // self.rows)))
        bound = self._signature.bind(None, hidden, weight, targets, reduction="sum", chunk_mem_const=chunk_mem_const)
        bound.apply_defaults()
        return self.function.apply(*bound.args[1:])[0]  # type: ignore[no-any-return]


def varlen_available(capability: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> bool:
    """torch's flash-attention varlen kernel (torch >= 2.10, sm80+), probed with a tiny forward and backward."""
    if capability < (8, 0):
        return False
    try:
        from workers.training.packing import _causal_varlen_attn

        q = torch.randn(16, 2, 64, device="cuda", dtype=dtype, requires_grad=True)
        bounds = torch.tensor([0, 8, 16], device="cuda", dtype=torch.int32)
        _causal_varlen_attn()(q, q, q, bounds, bounds, 8, 8).sum().backward()
    except Exception:  # noqa: BLE001 - missing, or no backward in this torch: sdpa it is
        return False
    return True


def free_memory(cap_gib: float | None) -> int:
    """Bytes free for this job's activations; with a cap, the process is held to it (beyond it: OOM and retry)."""
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    if cap_gib is None:
        return free
    cap_gpu_memory(cap_gib)
    return max(min(free, int(cap_gib * GIB) - torch.cuda.memory_reserved()), 0)


def graph_decoder(
    model: Any, row_tokens: int, max_samples: int, attention: str, dtype: torch.dtype
) -> tuple[GraphedDecoder | None, str]:
    """Capture the decoder layers as CUDA graphs, or say why not (the job then runs eagerly)."""
    try:
        with compute_autocast(dtype):
            return capture(model, row_tokens, max_samples + 1, attention), ""  # + 1: the row's filler segment
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: report and train eagerly
        return None, f"no CUDA graphs: {type(exc).__name__}: {str(exc)[:200]}"


@dataclass(frozen=True)
class Compute:
    """What the plan is made for: the autocast dtype (the load plan's) and the card's compute capability (or the
    one ``FLASHTUNE_CUDA_CAPABILITY`` names)."""

    dtype: torch.dtype = torch.bfloat16
    capability: tuple[int, int] = (9, 0)


def plan_cuda(
    model: Any,
    step_tokens: int,
    max_length: int,
    pad_id: int,
    max_samples: int,
    memory_cap_gib: float | None = None,
    options: CudaOptions = CudaOptions(),
    compute: Compute = Compute(),
    longest: int | None = None,
) -> CudaPlan:
    """Decide the CUDA path for this model and job (see the module docstring), within what ``options`` allow.

    ``step_tokens``: the most tokens one optimizer step's samples hold; ``max_samples``: samples per step;
    ``longest``: the job's longest sample (default ``max_length``)."""
    base = model.get_base_model()
    fused_ce, fused_layers, fallbacks = _liger(base, compute.dtype, options.fused_layers)
    attention, attention_note = set_attention(base, options.varlen, compute)
    free = free_memory(memory_cap_gib)
    layers = base.config.num_hidden_layers
    size = partial(
        size_micro_batch,
        base.config,
        step_tokens=step_tokens,
        max_length=max_length,
        fused_ce=fused_ce is not None,
        fused_layers=fused_layers,
        lora_bytes=lora_saved_bytes(model, layers),
    )
    sized = size(free)
    kept = 0
    if options.keep_dequantized and not sized[1]:
        kept = _keep_dequantized_if_spare(base, free, sized, size, compute.dtype)
    micro_tokens, checkpointing = balanced_row(sized[0], step_tokens, longest or max_length), sized[1]
    if checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad through the recompute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    row_tokens = -(-micro_tokens // options.row_multiple) * options.row_multiple  # one row length: sdpa and graphs
    graphed, note = None, "needs no checkpointing" if checkpointing else "turned off"
    if not checkpointing and options.graphs:
        graphed, note = graph_decoder(model, row_tokens, max_samples, attention, compute.dtype)
    # sdpa and graphs: every row padded to the one length; eager varlen: only to a multiple of 8
    row_multiple = row_tokens if attention == "sdpa" or graphed is not None else VARLEN_ROW_MULTIPLE
    scaler = torch.amp.GradScaler("cuda") if compute.dtype == torch.float16 else None
    plan = CudaPlan(
        micro_tokens,
        row_multiple,
        attention,
        checkpointing,
        fused_ce,
        fused_layers,
        free / GIB,
        graphed,
        note,
        kept,
        compute.dtype,
        scaler,
        compute.capability,
        attention_note,
        fallbacks,
    )
    warm_up(plan, model, micro_tokens, pad_id)
    return replace(plan, warm_memory_gib=(torch.cuda.max_memory_allocated() / GIB, torch.cuda.memory_reserved() / GIB))


def _liger(base: Any, dtype: torch.dtype, layers: bool) -> tuple[Any, bool, tuple[str, ...]]:
    """(fused cross-entropy or None, Liger layer kernels swapped in?, fallback notes): Liger's pieces where its
    kernels warm up on this GPU in ``dtype``; torch's own otherwise, with a note that says why."""
    fused_ce = liger_fused_ce()
    if fused_ce is None:  # not installed: nothing to fall back from
        return None, False, ()
    problem = liger_problem(dtype)
    if problem is not None:
        return None, False, (f"Liger kernels off, torch layers and cross-entropy instead: {problem}",)
    return fused_ce, layers and fuse_layers(base), ()


def set_attention(base: Any, varlen: bool, compute: Compute = Compute()) -> tuple[str, str]:
    """Varlen attention where allowed and the GPU has it, else sdpa with the packed mask; returns which, and why
    not varlen when not."""
    if varlen and varlen_available(compute.capability, compute.dtype):
        register_varlen_attention()
        base.set_attn_implementation(VARLEN)
        return "varlen", ""
    major, minor = compute.capability
    if not varlen:
        why = "varlen turned off"
    elif compute.capability < (8, 0):
        why = f"flash-attention varlen needs sm80, planned for sm{major}{minor}: exact block-diagonal mask instead"
    else:
        why = "torch's varlen kernel is not available: exact block-diagonal mask instead"
    base.set_attn_implementation("sdpa")
    return "sdpa", why


def _keep_dequantized_if_spare(
    base: Any, free: int, sized: tuple[int, bool], size: Callable[[int], tuple[int, bool]], dtype: torch.dtype
) -> int:
    """Give the NF4 layers dense copies of their weights in ``dtype`` where the micro-batch stays as large
    (``sized``) beside them; returns how many layers have one."""
    layers = nf4_layers(base)
    if not layers:
        return 0
    spare = free - dequantized_bytes(layers)
    if size(spare) != sized:
        return 0
    use_dense_copies(layers, dtype)
    return len(layers)


def warm_up(plan: CudaPlan, model: Any, tokens: int, pad_id: int) -> None:
    """One training and one evaluation pass on a full-length row, outside the timed loop: kernels are compiled
    (Liger's Triton kernels) and planned (cuDNN) here, and a row that does not fit fails now rather than mid-job."""
    [batch] = plan.pack([([pad_id] * tokens, [pad_id] * tokens)], pad_id)
    plan.loss(model, batch, 1).backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        plan.loss(model, batch, 1)
