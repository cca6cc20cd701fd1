"""Padding-free packing: samples concatenated into one row, each attending only to itself.

A padded batch of ~180-token samples padded to 512 spends most of its compute on padding. Here the samples of a
micro-batch are concatenated into one row of shape ``[1, T]`` with ``position_ids`` restarting at 0 for every
sample and no attention mask. transformers 5.x (``masking_utils.find_packed_sequence_indices``) reads the restarts
and builds a block-diagonal causal mask for sdpa/eager/flex attention (flash-attention uses the same position ids
as varlen boundaries), so each sample attends only to its own tokens and gets its own rotary positions: the
logits of a packed sample equal its unpacked logits. The forward must run without a KV cache (``use_cache=False``),
otherwise transformers skips that detection.

The label of each sample's first token is masked, so no sample is trained to predict the next sample's start.
``tests/unit/test_packing.py`` checks exactness on CPU: the per-sample loss of a packed row equals the unpacked loss.
Training selects this path at run time on CUDA only (``workers.training.cuda.plan``); nothing here needs a GPU to
import.

A dense block-diagonal mask makes sdpa compute the whole ``T x T`` score matrix of a ~2,800-token row (~26% of a
step's GPU time on the 7B shape). ``varlen_attention`` instead hands the samples' boundaries (``cu_seq_lens``, the
keyword transformers' flash-attention path uses) to torch's flash-attention varlen kernel, which computes only
each sample's own causal triangle. It is registered with transformers as the attention implementation
``VARLEN``; calls without boundaries (generation, batched scoring) take plain sdpa with transformers' mask.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


@dataclass
class PackedBatch:
    """One packed row: ``input_ids``/``position_ids``/``labels`` of shape ``[1, T]`` and each sample's length."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    lengths: list[int]

    def segments(self) -> list[int]:
        """Lengths of the row's attention segments: the samples, then the filler (if any)."""
        filler = self.num_tokens - self.num_real_tokens
        return self.lengths + ([filler] if filler else [])

    def bounds(self, count: int | None = None) -> list[int]:
        """The segments' cumulative boundaries (``cu_seq_lens``: 0, end of the first, ...), padded with empty
        segments to ``count`` segments when given (a CUDA graph's fixed shape)."""
        edges = [0, *itertools.accumulate(self.segments())]
        return edges + [edges[-1]] * ((count or 0) + 1 - len(edges))

    @property
    def num_tokens(self) -> int:
        """Tokens the GPU processes, filler included."""
        return int(self.input_ids.numel())

    @property
    def num_real_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def pack(rows: Sequence[tuple[list[int], list[int]]], pad_to_multiple: int = 1, pad_id: int = 0) -> PackedBatch:
    """Concatenate (input_ids, labels) rows into one row with per-sample position ids.

    ``pad_to_multiple`` rounds the row length up with a filler sequence of its own (positions from 0, no loss):
    attention kernels (cuDNN plans, compiled flex attention) are built once per row length, so a handful of
    lengths instead of one per optimizer step saves that set-up at a cost of a few percent more tokens.
    """
    if not rows:
        raise ValueError("nothing to pack")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    for row_ids, row_labels in rows:
        if len(row_ids) != len(row_labels) or not row_ids:
            raise ValueError("each row needs as many labels as input ids, and at least one token")
        ids.extend(row_ids)
        labels.append(IGNORE)  # the first token of a sample is never a target
        labels.extend(row_labels[1:])
        positions.extend(range(len(row_ids)))
        lengths.append(len(row_ids))
    filler = -len(ids) % max(pad_to_multiple, 1)
    ids.extend([pad_id] * filler)
    labels.extend([IGNORE] * filler)
    positions.extend(range(filler))
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        labels=torch.tensor([labels], dtype=torch.long),
        lengths=lengths,
    )


def pack_by_tokens(
    rows: Sequence[tuple[list[int], list[int]]], max_tokens: int, pad_to_multiple: int = 1, pad_id: int = 0
) -> list[PackedBatch]:
    """Split rows into as few packed micro-batches of at most ``max_tokens`` tokens as balancing finds, with about
    as many tokens in each.

    Which rows share a micro-batch does not change the step's gradient (the micro-batches' losses are summed over
    the step's target tokens), but every row of a graphed job is padded to one length: two micro-batches of ~1,340
    tokens cost less than one of 2,200 and one of 480 padded to 2,200. Rows go, longest first, to the micro-batch
    with the fewest tokens so far (longest-processing-time scheduling: none ends more than one row above the mean);
    with too many rows for that, one more micro-batch is tried. Within a micro-batch the rows keep their order, and
    the micro-batches are ordered by their first row. A row longer than ``max_tokens`` gets a micro-batch of its own.
    """
    if not rows:
        return []
    lengths = [len(ids) for ids, _ in rows]
    count = min(max(-(-sum(lengths) // max(max_tokens, 1)), 1), len(rows))
    while True:
        bins = _balanced_bins(lengths, count)
        if all(len(b) == 1 or sum(lengths[i] for i in b) <= max_tokens for b in bins) or count >= len(rows):
            break
        count += 1
    return [pack([rows[i] for i in b], pad_to_multiple, pad_id) for b in sorted(filter(None, bins), key=min)]


def _balanced_bins(lengths: list[int], count: int) -> list[list[int]]:
    """Indices of ``lengths`` in ``count`` bins, longest first into the emptiest bin; each bin in index order."""
    bins: list[list[int]] = [[] for _ in range(count)]
    totals = [0] * count
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        emptiest = min(range(count), key=lambda b: (totals[b], b))
        bins[emptiest].append(i)
        totals[emptiest] += lengths[i]
    return [sorted(b) for b in bins]


def _causal_lm(model: Any) -> Any:
    """The transformers ``*ForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packed_forward_hidden(model: Any, batch: PackedBatch, device: str | torch.device) -> torch.Tensor:
    """Final hidden states ``[T, H]`` of a packed row (the decoder only, no LM head)."""
    lm = _causal_lm(model)
    longest = max(batch.segments())
    bounds = torch.tensor(batch.bounds(), dtype=torch.int32).to(device, non_blocking=True)
    out = lm.model(
        input_ids=batch.input_ids.to(device),
        position_ids=batch.position_ids.to(device),
        attention_mask=None,  # sdpa/eager/flex: the packed mask comes from the position ids
        use_cache=False,
        # varlen/flash attention: the sample boundaries (transformers passes these keywords to the attention call)
        cu_seq_lens_q=bounds,
        cu_seq_lens_k=bounds,
        max_length_q=longest,
        max_length_k=longest,
    )
    return out.last_hidden_state[0]


VARLEN = "packed_varlen"  # no "flash" in the name: transformers would take it for a flash-attention kernel


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sample, as a transformers attention function (``[B, T, H, D]`` out).

    On CUDA torch's flash-attention varlen kernel; elsewhere one sdpa call per sample, the reference the CPU tests
    compare against. Without ``cu_seq_lens_q`` (not a packed row) it is plain sdpa.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [1, H, T, D] -> [T, H, D]
    if q.is_cuda:
        longest = int(kwargs["max_length_q"])
        out = _causal_varlen_attn()(q, k, v, bounds, bounds, longest, longest, scale=scaling)
    else:
        edges = bounds.tolist()
        out = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    q[a:b].transpose(0, 1),
                    k[a:b].transpose(0, 1),
                    v[a:b].transpose(0, 1),
                    is_causal=True,
                    scale=scaling,
                ).transpose(0, 1)
                for a, b in itertools.pairwise(edges)
                if b > a  # empty segments pad a graphed row's boundaries
            ]
        )
    return out.unsqueeze(0), None


@functools.cache
def _causal_varlen_attn() -> Callable[..., torch.Tensor]:
    """torch's varlen flash attention, causal; raises ImportError before torch 2.10."""
    from torch.nn.attention.varlen import varlen_attn

    # torch 2.10 takes is_causal; later versions express causality as a window of (all before, none after)
    causal = (
        {"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters else {"window_size": (-1, 0)}
    )
    return functools.partial(varlen_attn, **causal)  # type: ignore[arg-type,return-value]


def register_varlen_attention() -> None:
    """Make ``VARLEN`` a transformers attention implementation (masks as for sdpa, used only without boundaries)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def packed_loss(
    model: Any,
    batch: PackedBatch,
    device: str | torch.device,
    denominator: int,
    fused_ce: Any = None,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed response-token cross-entropy of a packed row, divided by the optimizer step's target tokens.

    Only the positions that predict a target go through the output embedding: the prompts' (~40% of the user's
    seed tokens) and the filler's would be multiplied by the 102k-word vocabulary only to be ignored. They are found
    on the host, where the labels are: finding them does not wait for the GPU. ``fused_ce`` is an optional fused linear
    cross-entropy (e.g. Liger's, ``reduction="sum"``) called as ``fused_ce(lm_head_weight, hidden, targets)``; it
    never materialises the ``T x vocab`` logits. ``hidden``: the row's final hidden states when the caller computed
    them (``workers.training.cuda.graphs``).
    """
    if hidden is None:
        hidden = packed_forward_hidden(model, batch, device)
    labels = batch.labels[0, 1:]
    kept = (labels != IGNORE).nonzero().squeeze(1)
    if not len(kept):  # no target in the row: one ignored position keeps the loss (0) in the autograd graph
        kept = torch.zeros(1, dtype=torch.long, device=labels.device)
    targets = labels[kept].to(device)
    hidden = hidden[:-1].index_select(0, kept.to(hidden.device))
    head = _causal_lm(model).get_output_embeddings()
    if fused_ce is not None:
        loss = fused_ce(head.weight, hidden, targets)
    else:
        logits = head(hidden).float()
        loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return loss / max(denominator, 1)


@torch.no_grad()
def per_sample_losses(model: Any, batch: PackedBatch, device: str | torch.device = "cpu") -> list[float]:
    """Summed target-token cross-entropy of each sample in a packed row (for exactness checks)."""
    hidden = packed_forward_hidden(model, batch, device)
    logits = _causal_lm(model).get_output_embeddings()(hidden[:-1]).float()
    targets = batch.labels[0, 1:].to(device)
    token_loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    losses, start = [], 0
    for length in batch.lengths:
        # token t predicts t+1: the sample's targets are its positions 1..len-1, i.e. logits start..start+len-2
        losses.append(float(token_loss[start : start + length - 1].sum()))
        start += length
    return losses
