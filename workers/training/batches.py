"""From tokenised rows to what one optimizer step trains on: which rows (the epoch's order), on this rank, as
padded micro-batches (CPU) or packed rows (CUDA).

A row is ``(input_ids, labels)`` (``workers.training.token_cache``), labels -100 over the prompt. The order of every
epoch is derived from (seed, epoch) alone (``workers.training.steps``), so step ``n`` is the same samples whether the
job ran through or resumed there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.llm.prompts import Example
from workers.training.packing import PackedBatch
from workers.training.steps import epoch_order, max_step_tokens
from workers.training.token_cache import Row, tokenize_cached


@dataclass
class Batch:
    """A padded micro-batch (the CPU path): rows right-padded to the longest, labels -100 past each row's end."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != -100).sum())


def tokenize(examples: list[Example], tokenizer: Any, max_length: int, cache_dir: Path | None = None) -> list[Row]:
    """(input_ids, labels) per example, cut to ``max_length``; labels are -100 over the prompt."""
    return truncate(tokenize_cached(examples, tokenizer, cache_dir), max_length)


def truncate(rows: list[Row], max_length: int) -> list[Row]:
    return [(ids[:max_length], labels[:max_length]) for ids, labels in rows]


def collate(rows: list[Row], pad_id: int) -> Batch:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return Batch(input_ids, attention, labels)


def collate_all(rows: list[Row], pad_id: int, size: int) -> list[Batch]:
    """``rows`` in order, as padded micro-batches of ``size`` rows."""
    return [collate(rows[i : i + size], pad_id) for i in range(0, len(rows), size)]


@dataclass(frozen=True)
class StepBatches:
    """The training rows of a job, cut into optimizer steps of ``batch_size`` samples in each epoch's order.

    ``shard``: this rank's share of a step's samples (``workers.training.distributed``); ``pack``: the CUDA plan's
    packing of a step's rows (``CudaPlan.pack``), else micro-batches of ``micro_batch_size`` padded rows;
    ``balanced``: the steps' token counts evened out (``workers.training.steps``)."""

    rows: list[Row]
    batch_size: int
    micro_batch_size: int
    seed: int
    pad_id: int
    shard: Callable[[list[Any]], list[Any]] = list
    pack: Callable[[list[Row], int], list[PackedBatch]] | None = None
    balanced: bool = True
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", [len(ids) for ids, _ in self.rows])

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def packed_by(self, pack: Callable[[list[Row], int], list[PackedBatch]]) -> StepBatches:
        """The same steps, packed by ``pack`` (the CUDA path)."""
        return dataclasses.replace(self, pack=pack)

    def max_step_tokens(self, epochs: int) -> int:
        """The most tokens any step of ``epochs`` epochs holds on this rank (the CUDA plan's row size)."""
        return max_step_tokens(self.lengths, self.batch_size, epochs, self.seed, self.shard, self.balanced)

    def __call__(self, step: int) -> list[Batch] | list[PackedBatch]:
        """This rank's share of step ``step``'s samples (0-based, counted over all epochs)."""
        epoch, index_in_epoch = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.lengths, self.batch_size, self.seed, epoch, self.balanced)
        start = index_in_epoch * self.batch_size
        chosen = self.shard([self.rows[i] for i in order[start : start + self.batch_size]])
        if self.pack is not None:
            return self.pack(chosen, self.pad_id)
        return collate_all(chosen, self.pad_id, self.micro_batch_size)
