"""A training job's decoder layers captured as CUDA graphs: one replay per forward and one per backward pass.

Why: a packed optimizer step of the user's recipe on the 7B shape is ~2,700 tokens. The GPU needs ~0.2 s for it,
and the host needs about as long to launch its ~4,000 kernels one by one (30 layers of NF4 dequantisation, LoRA,
dropout, casts, norms, rotary embeddings, attention), so the eager loop is bound by kernel launches: fused kernels,
which cut GPU time but launch through Python, made the eager step slower (docs/benchmarks.md). A CUDA graph
launches all of a pass's kernels at once.

What it takes, checked by :func:`capture` (otherwise the job runs eagerly and its ``cuda_plan`` event says why):

- A Llama-family layout (``model.embed_tokens``, ``rotary_emb``, ``layers``, ``norm``): the layers then take only
  tensors of fixed shapes. Every row of the job is padded to one length, and the sample boundaries to a fixed count
  with empty segments at the end. With varlen attention (``workers.training.packing.varlen_attention``, sm80+) the
  boundaries go to the kernel; with sdpa (T4, V100: no flash-attention varlen kernel) the stack turns them into the
  block-diagonal causal mask on the GPU, once per pass (:func:`block_causal_bias`), so nothing waits on the host
  there either.
- No gradient checkpointing.

Training passes (gradients on, model in train mode) replay the forward and backward graphs. The validation loss at
each epoch's end replays a forward-only graph captured in eval mode (no LoRA dropout, no autograd;
:class:`ForwardOnly`), where its packed row fits the captured shape; otherwise, and for generation, the layers run
eagerly. The embeddings, the final norm and the loss stay eager too (the fused cross-entropy reads a count back
from the GPU).

Gradients: the graphed backward hands out the same output buffers on every replay. Autograd would take such a
buffer as a parameter's ``.grad`` when ``.grad`` is None, and the next micro-batch's replay would overwrite it,
so the loop keeps zero-filled gradients (``zero_grad(set_to_none=False)``) that autograd adds into.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch

from service.llm.graph_capture import record
from workers.training.packing import PackedBatch


def block_causal_bias(bounds: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask ``[1, 1, T, T]`` of a packed row whose segments end at ``bounds[1:]`` (empty
    segments allowed): 0 where a token may attend (same segment, not after it), the dtype's minimum elsewhere. Built
    on the GPU without reading anything back, so it can be captured in a graph."""
    positions = torch.arange(tokens, device=bounds.device, dtype=bounds.dtype)
    segment = torch.searchsorted(bounds[1:].contiguous(), positions, right=True)
    allowed = (segment[:, None] == segment[None, :]) & (positions[:, None] >= positions[None, :])
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=bounds.device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=bounds.device), blocked)[None, None]


class DecoderStack(torch.nn.Module):
    """The decoder layers as one module of tensor arguments (the model's own layers, not copies). ``attention``:
    ``varlen`` hands the boundaries to the varlen kernel; ``sdpa`` builds the block-diagonal mask from them."""

    def __init__(self, layers: torch.nn.ModuleList, row_tokens: int, attention: str = "varlen") -> None:
        super().__init__()
        self.layers = layers
        self.row_tokens = row_tokens  # varlen's longest-segment bound: fixed, so it can be baked into the graph
        self.attention = attention

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        longest = self.row_tokens
        if self.attention == "sdpa":  # one mask for every layer: they save the same tensor for their backward
            packed: dict[str, Any] = {"attention_mask": block_causal_bias(bounds, hidden.shape[1], hidden.dtype)}
        else:
            packed = {
                "attention_mask": None,
                "cu_seq_lens_q": bounds,
                "cu_seq_lens_k": bounds,
                "max_length_q": longest,
                "max_length_k": longest,
            }
        for layer in self.layers:
            out = layer(hidden, position_embeddings=(cos, sin), **packed)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


class ForwardOnly:
    """A decoder stack's forward pass as captured in eval mode, without autograd: one replay per validation row.
    Its inputs and output live in the graph's own buffers."""

    def __init__(self, stack: DecoderStack, *example: torch.Tensor) -> None:
        self.inputs = tuple(t.clone() for t in example)
        with torch.no_grad():
            self.graph, self.output = record(lambda: stack(*self.inputs))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the graph's output


@dataclass
class GraphedDecoder:
    lm: Any  # the *ForCausalLM whose layers are graphed
    stack: Any  # the DecoderStack after torch.cuda.make_graphed_callables
    row_tokens: int  # every packed row has exactly this many tokens
    max_segments: int  # samples (and filler) one row may hold
    forward_only: ForwardOnly | None = None  # the same layers in eval mode, for the validation loss
    device: str = "cuda"

    def release(self) -> None:
        """Drop the graphs, and with them their memory pools (the activations of a whole micro-batch): the job's
        training passes are over. The evaluation after them scores eagerly, and under a memory cap it needs that
        room (session 14: an all-linear r 16 job at a 21 GiB cap ran out of memory in its evaluation while the
        graphs still held 15.2 GiB)."""
        self.stack = None
        self.forward_only = None
        gc.collect()  # make_graphed_callables' forward refers to its module: a cycle
        torch.cuda.empty_cache()

    def fits(self, batch: PackedBatch) -> bool:
        """Whether a packed row has the captured shape: always for training rows; validation rows are not bounded
        by the step's sample count, and a sample longer than the row gets a longer row of its own."""
        return len(batch.segments()) <= self.max_segments and batch.num_tokens == self.row_tokens

    def can_validate(self, batch: PackedBatch) -> bool:
        """Whether a validation row replays the forward-only graph (captured, and the row fits it)."""
        return self.forward_only is not None and self.fits(batch)

    def bounds(self, batch: PackedBatch) -> torch.Tensor:
        """The row's segment boundaries, padded with empty segments to the captured count."""
        if not self.fits(batch):
            raise ValueError(
                f"a row of {batch.num_tokens} tokens in {len(batch.segments())} segments does not "
                f"fit the graph ({self.row_tokens} tokens, {self.max_segments} segments)"
            )
        edges = batch.bounds(self.max_segments)
        return torch.tensor(edges, dtype=torch.int32).to(self.device, non_blocking=True)

    def hidden(self, batch: PackedBatch, training: bool = True) -> torch.Tensor:
        """Final hidden states ``[T, H]`` of a packed row, the layers replayed from the training graphs or (not
        ``training``) from the forward-only one."""
        layers = self.stack if training else self.forward_only
        if layers is None:
            raise ValueError("released" if self.stack is None else "no forward-only graph was captured")
        inner = self.lm.model
        hidden = inner.embed_tokens(batch.input_ids.to(self.device, non_blocking=True))
        cos, sin = inner.rotary_emb(hidden, batch.position_ids.to(self.device, non_blocking=True))
        return inner.norm(layers(hidden, cos, sin, self.bounds(batch)))[0]


def capture(model: Any, row_tokens: int, max_segments: int, attention: str = "varlen") -> GraphedDecoder:
    """Graph the decoder layers of ``model`` (a PeftModel) for rows of ``row_tokens`` tokens, with ``attention``
    (``varlen`` or ``sdpa``, as the model is set up); raises if it cannot.

    Call under the autocast the loop uses, with its cache off (a cached cast would outlive the graph's inputs).
    """
    lm = model.get_base_model()
    inner: Any = getattr(lm, "model", None)
    model.train()  # LoRA dropout is recorded into the graph only if it is active while capturing
    if not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm")):
        raise ValueError(f"{type(lm).__name__} has no Llama-style decoder to graph")
    stack = DecoderStack(inner.layers, row_tokens, attention)
    hidden = torch.zeros(1, row_tokens, lm.config.hidden_size, device="cuda", dtype=inner.embed_tokens.weight.dtype)
    cos, sin = inner.rotary_emb(hidden, torch.arange(row_tokens, device="cuda").unsqueeze(0))
    bounds = torch.tensor([0] + [row_tokens] * max_segments, dtype=torch.int32, device="cuda")
    graphed = _graph_training_passes(stack, (hidden, cos, sin, bounds))
    forward_only = _forward_only(model, row_tokens, attention, hidden, cos, sin, bounds)
    return GraphedDecoder(lm, graphed, row_tokens, max_segments, forward_only)


def _graph_training_passes(stack: DecoderStack, example: tuple[torch.Tensor, ...]) -> Any:
    """``torch.cuda.make_graphed_callables`` of the stack, its warm-up pass run here and the memory that pass cached
    given back before the capture. Its own warm-up would leave that memory cached beside the graphs' pool (the
    allocator frees nothing while capturing), so under a memory cap the capture would need room for a micro-batch's
    activations twice. The warm-up initialises what a capture must not (cuBLAS and cuDNN plans, Liger's Triton
    kernels), on a side stream as torch's own does. Measured on an H100 with a 13 GiB cap (docs/benchmarks.md,
    session 13): captured and replayed, 9,588 real tokens/s steady at 8.41 GiB allocated."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        output = stack(*example)
        trainable = [p for p in stack.parameters() if p.requires_grad]
        torch.autograd.grad(output, trainable, torch.ones_like(output), allow_unused=True)
    torch.cuda.current_stream().wait_stream(stream)
    del output
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.make_graphed_callables(stack, example, num_warmup_iters=0)


def _forward_only(model: Any, row_tokens: int, attention: str, *example: torch.Tensor) -> ForwardOnly | None:
    """The forward-only graph of the validation loss, or None (the validation loss then runs eagerly; training
    keeps its graphs). A stack of its own: make_graphed_callables replaced the training stack's forward."""
    model.eval()
    try:
        return ForwardOnly(DecoderStack(model.get_base_model().model.layers, row_tokens, attention), *example)
    except Exception:  # noqa: BLE001 - an optimisation of the validation loss only
        torch.cuda.empty_cache()
        return None
    finally:
        model.train()
