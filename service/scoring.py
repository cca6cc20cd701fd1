"""Label probabilities by scoring continuations, and greedy generation; used by /analyze and job evaluation.

The label is not parsed from generated text: for each news item the model scores the three label words at the
label's fixed place in the standard response (``service.prompts``), and the softmax of those log-likelihoods
gives the probabilities. Importance (stars) and the market reaction are scored the same way. All items of a
batch go through one forward pass per stage.

``adapter_names`` (one per item, ``BASE`` for none) runs a batch whose items use different LoRA adapters of
one PeftModel in the same forward passes (peft's mixed-batch inference); it is passed on to every forward call.

:func:`generate_stream` generates one prompt token by token, handing each new piece of text to a callback as the
token comes out of the model (``POST /v1/chat/completions`` with ``stream: true``).
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from service.prompts import (
    DEFAULT_INSTRUCTION,
    LABEL_PREFIX_TEMPLATE,
    LABEL_WORDS,
    LABELS,
    REACTION_PREFIX_TEMPLATE,
    REACTION_WORDS,
    STAR_PREFIX,
    STARS,
    Label,
    NewsItem,
    render_prompt,
)

Text = str | NewsItem  # a news text, or a text with metadata / market context
BASE = "__base__"  # peft's adapter name for "no adapter" in a mixed batch's adapter_names


@dataclass(frozen=True)
class Prediction:
    label: Label
    probs: dict[Label, float]
    importance: int
    market_reaction: str

    @property
    def score(self) -> float:
        return self.probs[self.label]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (computes the vocabulary logits of the last positions
    only); every transformers causal LM does, a PeftModel passes it on to its base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@torch.no_grad()
def continuation_logprobs(
    model: Any, tokenizer: Any, contexts: Sequence[str], candidates: Sequence[Sequence[str]],
    adapter_names: Sequence[str] | None = None,
) -> list[list[float]]:  # fmt: skip
    """log P(candidate | context) for every candidate of every context, in one batched forward pass.

    Each sequence is tokenised whole (as in training), and all candidates of a context are scored from the
    first token where any of them departs from the context, so their scores compare like with like. Sequences
    are left-padded (position ids counted from each one's first real token), so every candidate ends at the last
    position and only the last few positions' vocabulary logits are computed: with a 100k vocabulary, full
    logits of a batch of 32 news items (11 candidate sequences each) would take tens of GB.
    """
    sequences: list[list[int]] = []
    starts: list[int] = []
    for context, options in zip(contexts, candidates, strict=True):
        ctx_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
        full = [tokenizer(context + option, add_special_tokens=True)["input_ids"] for option in options]
        start = max(1, min(_common_prefix(ctx_ids, ids) for ids in full))
        sequences.extend(full)
        starts.extend([start] * len(full))
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    keep = max(len(ids) - start for ids, start in zip(sequences, starts, strict=True)) + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    extra: dict[str, Any] = {"logits_to_keep": keep} if _keeps_logits(model) else {}
    if adapter_names is not None:  # one name per sequence: every candidate of a context runs with its adapter
        extra["adapter_names"] = [n for n, opts in zip(adapter_names, candidates, strict=True) for _ in opts]
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device), **extra
    ).logits[:, -keep:]
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # kept position i predicts the token at i + 1
    targets = input_ids[:, width - keep + 1 :].to(device)
    token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
    # a row of length n has its scored tokens (from ``start``) in the last n - start target positions
    scores = [float(token_lp[row, keep - len(ids) + starts[row] - 1 :].sum()) for row, ids in enumerate(sequences)]
    out, i = [], 0
    for options in candidates:
        out.append(scores[i : i + len(options)])
        i += len(options)
    return out


def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


RESPONSE_BUDGET = 192  # tokens kept free for the prompt scaffold and the response


def build_prompts(
    model: Any, tokenizer: Any, texts: Sequence[Text], instructions: Sequence[str] | None = None
) -> list[str]:
    """Training-format prompts, each news text clipped so prompt and response fit the model's context.

    A :class:`NewsItem`'s fields are rendered after its text is clipped, so a long text never pushes them out.
    """
    limit = min(int(tokenizer.model_max_length), int(getattr(model.config, "max_position_embeddings", 1 << 30)))
    budget = max(limit - RESPONSE_BUDGET, 16)
    prompts = []
    for item, instruction in zip(texts, instructions or [DEFAULT_INSTRUCTION] * len(texts), strict=True):
        text = item.text if isinstance(item, NewsItem) else item
        room = budget
        if isinstance(item, NewsItem) and item.fields:
            room = max(budget - len(tokenizer(item.render(""), add_special_tokens=False)["input_ids"]), 16)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > room:  # long real news: keep the head, where the facts are
            text = tokenizer.decode(ids[:room], skip_special_tokens=True)
        prompts.append(render_prompt(item.render(text) if isinstance(item, NewsItem) else text, instruction))
    return prompts


def classify(
    model: Any, tokenizer: Any, texts: Sequence[Text], instructions: Sequence[str] | None = None,
    adapter_names: Sequence[str] | None = None,
) -> list[Prediction]:  # fmt: skip
    """Importance, label probabilities and market reaction for each text, by scoring the standard response
    (``adapter_names``: each text's adapter, for a mixed batch)."""
    prompts = build_prompts(model, tokenizer, texts, instructions)
    star_scores = continuation_logprobs(
        model, tokenizer, prompts, [[f"{STAR_PREFIX}{s}星级" for s in STARS]] * len(prompts), adapter_names
    )
    stars = [STARS[max(range(len(STARS)), key=row.__getitem__)] for row in star_scores]
    label_scores = continuation_logprobs(
        model,
        tokenizer,
        [p + LABEL_PREFIX_TEMPLATE.format(star=s) for p, s in zip(prompts, stars, strict=True)],
        [[LABEL_WORDS[label] for label in LABELS]] * len(prompts),
        adapter_names,
    )
    probs = [dict(zip(LABELS, _softmax(row), strict=True)) for row in label_scores]
    labels: list[Label] = [max(p, key=p.__getitem__) for p in probs]
    reaction_scores = continuation_logprobs(
        model,
        tokenizer,
        [
            p + REACTION_PREFIX_TEMPLATE.format(star=s, label=LABEL_WORDS[lab])
            for p, s, lab in zip(prompts, stars, labels, strict=True)
        ],
        [[REACTION_WORDS[label] for label in LABELS]] * len(prompts),
        adapter_names,
    )
    reactions = [REACTION_WORDS[LABELS[max(range(3), key=row.__getitem__)]] for row in reaction_scores]
    return [
        Prediction(label=lab, probs=p, importance=s, market_reaction=r)
        for lab, p, s, r in zip(labels, probs, stars, reactions, strict=True)
    ]


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, adapter_names: Sequence[str] | None = None
) -> list[str]:
    """Greedy continuations of a batch of prompts (left-padded), decoded without special tokens
    (``adapter_names``: each prompt's adapter, for a mixed batch)."""
    if max_new_tokens <= 0:
        return ["" for _ in prompts]
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **({} if adapter_names is None else {"adapter_names": list(adapter_names)}),
    )
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class _TextStreamer:
    """A ``generate`` streamer: decodes the tokens so far after each step and hands on the text that is new.

    Text is held back while it ends in an incomplete character (a byte-level token can be part of a CJK
    character) or in whitespace, and leading and trailing whitespace are dropped, so the pieces join up to exactly
    what :func:`generate` returns for the same prompt.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def _text(self) -> str:
        return str(self.tokenizer.decode(self.tokens, skip_special_tokens=True)).strip()

    def _emit(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            piece, self.sent = text[len(self.sent) :], text
            self.on_text(piece)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self._text()
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self) -> None:
        self._emit(self._text())


class _StopWhenSet:
    """A stopping criterion: stop generating once ``event`` is set (the client went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_stream(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, on_text: Callable[[str], None],
    stop: threading.Event | None = None,
) -> int:  # fmt: skip
    """Greedy generation of one prompt, calling ``on_text`` with each new piece of text as its token is generated;
    stops early when ``stop`` is set. Returns the number of tokens generated. Same decoding as :func:`generate`."""
    from transformers import StoppingCriteriaList

    if max_new_tokens <= 0:
        return 0
    device = next(model.parameters()).device
    batch = tokenizer([prompt], return_tensors="pt").to(device)
    streamer = _TextStreamer(tokenizer, on_text)
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop or threading.Event())]),
    )
    return int(output.shape[1] - batch["input_ids"].shape[1])
