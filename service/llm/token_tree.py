"""Candidate continuations as token trees, so that one forward pass scores them all and computes their prompt once.

An item (one news text) is scored as groups: a context and the candidates scored against each other (the stars;
the labels after each star; the reactions after each star and label). All of an item's sequences (context +
candidate) start with the same head, the prompt, and then branch. :func:`encode_items` turns each item into a
:class:`TreeRow`: the ``trunk`` (the head's tokens but its last) and :class:`Branches`, a trie of the rest rooted
at the head's last token. In the forward pass every branch token attends to the trunk and to its own ancestors, at
its depth as position, so each sequence is computed exactly as if it were alone.

Tokenisation is that of each whole sequence, as in training. The head is tokenised once per item and the
continuations once (cached across calls), which equals tokenising the whole sequence where the tokenizer splits at
the head's end; that is checked for every item (the head followed by each distinct first character of the
continuations), and an item where it does not hold is tokenised sequence by sequence. Items with the same
continuations (every /analyze item) share one :class:`Branches`, whose ancestry is worked out once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Group = tuple[str, Sequence[str]]  # a context and the candidate continuations scored against each other


@dataclass(frozen=True)
class Branches:
    """A trie of token sequences laid out for one row: nodes whose next-token distribution is never read first,
    the ``predicting`` ones last (only the row's last logits are computed)."""

    tokens: np.ndarray  # node tokens, in row order
    depths: np.ndarray  # node depth below the root (the root, the head's last token, is 0)
    ancestry: np.ndarray  # [i, j]: node i may attend to node j (an ancestor or itself)
    predicting: int  # how many nodes at the end predict a scored token
    places: np.ndarray  # per scored token, in sequence order: the predicting node (index among the last ones)
    targets: np.ndarray  # per scored token: its token id
    lengths: tuple[int, ...]  # per sequence, in group order: how many scored tokens it has


@dataclass(frozen=True)
class TreeRow:
    trunk: list[int]  # the head's tokens but the last, attended causally by everything after them
    branches: Branches


@functools.lru_cache(maxsize=64)
def build_branches(sequences: tuple[tuple[int, ...], ...], starts: tuple[int, ...]) -> Branches:
    """The trie of ``sequences``; each sequence's tokens from index ``starts[i]`` (at least 1) are scored."""
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    children: dict[tuple[int, int], int] = {}
    scored: list[list[tuple[int, int]]] = []  # per sequence: (node that predicts it, token)
    for ids, start in zip(sequences, starts, strict=True):
        node, pairs = -1, []
        for j, token in enumerate(ids):
            if j >= start:
                pairs.append((node, token))
            if (node, token) not in children:
                children[node, token] = len(tokens)
                tokens.append(token)
                parents.append(node)
                depths.append(depths[node] + 1 if node >= 0 else 0)
            node = children[node, token]
        scored.append(pairs)
    predicting = sorted({node for pairs in scored for node, _ in pairs})
    chosen = set(predicting)
    order = [n for n in range(len(tokens)) if n not in chosen] + predicting
    allowed = np.zeros((len(tokens), len(tokens)), dtype=bool)
    for node, parent in enumerate(parents):  # parents come first: a node sees what its parent sees, and itself
        if parent >= 0:
            allowed[node] = allowed[parent]
        allowed[node, node] = True
    place = {node: i for i, node in enumerate(predicting)}
    return Branches(
        tokens=np.array(tokens, dtype=np.int64)[order],
        depths=np.array(depths, dtype=np.int64)[order],
        ancestry=allowed[np.ix_(order, order)],
        predicting=len(predicting),
        places=np.array([place[node] for pairs in scored for node, _ in pairs], dtype=np.int64),
        targets=np.array([token for pairs in scored for _, token in pairs], dtype=np.int64),
        lengths=tuple(len(pairs) for pairs in scored),
    )


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _branches(sequences: Sequence[Sequence[int]], groups: Sequence[Group]) -> Branches:
    """The branches of an item's sequences (each group's context, then its candidates; the trunk already cut off).

    A context's own sequence only sets where its candidates' scored tokens start: at the first token where any of
    them departs from the context, so their scores compare like with like."""
    candidates: list[tuple[int, ...]] = []
    starts: list[int] = []
    at = 0
    for _, options in groups:
        context, full = sequences[at], sequences[at + 1 : at + 1 + len(options)]
        candidates.extend(tuple(ids) for ids in full)
        starts.extend([max(1, min(_common_prefix(context, ids) for ids in full))] * len(options))
        at += 1 + len(options)
    return build_branches(tuple(candidates), tuple(starts))


def _texts(groups: Sequence[Group], head: str) -> list[str]:
    """Each group's context and then its candidates' full texts, with ``head`` cut off the front."""
    return [text[len(head) :] for context, options in groups for text in (context, *(context + o for o in options))]


@functools.lru_cache(maxsize=64)
def _encode_tails(tokenizer: Any, tails: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(ids) for ids in tokenizer(list(tails), add_special_tokens=False)["input_ids"])


def encode_items(tokenizer: Any, items: Sequence[Sequence[Group]]) -> list[TreeRow]:
    """Each item's sequences as a :class:`TreeRow` (see the module's docstring for the tokenisation)."""
    heads = [os.path.commonprefix([context for context, _ in groups]) for groups in items]
    tails = [_texts(groups, head) for groups, head in zip(items, heads, strict=True)]
    # the check: each head tokenised alone, and followed by each distinct first character of its continuations
    probes = [sorted({t[0]: t for t in reversed(item_tails) if t}.values()) for item_tails in tails]
    texts = [text for head, ps in zip(heads, probes, strict=True) for text in (head, *(head + p for p in ps))]
    encoded = iter(tokenizer(texts, add_special_tokens=True)["input_ids"])
    rows = []
    for groups, head, item_tails, item_probes in zip(items, heads, tails, probes, strict=True):
        head_ids = next(encoded)
        tail_ids = _encode_tails(tokenizer, tuple(item_tails))
        known = dict(zip(item_tails, tail_ids, strict=True))
        probed = [next(encoded) for _ in item_probes]
        if head_ids and all(ids == head_ids + list(known[p]) for ids, p in zip(probed, item_probes, strict=True)):
            root = (head_ids[-1],)
            rows.append(TreeRow(head_ids[:-1], _branches([root + ids for ids in tail_ids], groups)))
            continue
        whole = tokenizer([head + t for t in item_tails], add_special_tokens=True)["input_ids"]
        trunk = max(min(_common_prefix(whole[0], ids) for ids in whole) - 1, 0)
        rows.append(TreeRow(whole[0][:trunk], _branches([ids[trunk:] for ids in whole], groups)))
    return rows
