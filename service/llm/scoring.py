"""Label probabilities by scoring continuations, and greedy generation; used by /analyze and job evaluation.

The label is not parsed from generated text: for each news item the model scores the three label words at the
label's fixed place in the standard response (``service.llm.prompts``), and the softmax of those log-likelihoods
gives the probabilities. Importance (stars) and the market reaction are scored the same way, in one or two
forward passes per batch, each item's candidates sharing its prompt in a token tree (:func:`group_logprobs`).

``adapter_names`` (one per item, ``BASE`` for none) runs a batch whose items use different LoRA adapters of
one PeftModel in the same forward passes (peft's mixed-batch inference); it is passed on to every forward call,
inside :func:`mixed_batch`.

:func:`write_analyses` writes /analyze's text as the continuation of the response prefix that states the scored
stars, label and reaction, so the text never contradicts them. :meth:`Prediction.calibrated` scales the label
probabilities by an adapter's fitted temperature (``service.llm.calibration``).

:func:`generate_stream` generates one prompt token by token, handing each new piece of text to a callback as the
token comes out of the model (``POST /v1/chat/completions`` with ``stream: true``).
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from service.llm import calibration
from service.llm.decoding import decoder_for
from service.llm.prompts import (
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
    parse_response,
    render_prompt,
    render_response_prefix,
)
from service.llm.scoring_graphs import ONE_PASS_ROWS, WIDTH_MULTIPLE, ScoringGraphs
from service.llm.token_tree import Group, encode_items

Text = str | NewsItem  # a news text, or a text with metadata / market context
BASE = "__base__"  # peft's adapter name for "no adapter" in a mixed batch's adapter_names


@dataclass(frozen=True)
class Prediction:
    """A scored news item: the label probabilities (calibrated when ``temperature`` is set), the raw label
    log-likelihoods they come from (``LABELS`` order), importance and market reaction."""

    label: Label
    probs: dict[Label, float]
    importance: int
    market_reaction: str
    label_logprobs: tuple[float, ...] = ()
    temperature: float | None = None  # the calibration applied to ``probs`` (None: the raw softmax)

    @property
    def score(self) -> float:
        return self.probs[self.label]

    def calibrated(self, temperature: float | None) -> Prediction:
        """This prediction with its probabilities scaled by ``temperature`` (``service.llm.calibration``; None: as it
        is). The label stays: a positive temperature never changes the most probable one."""
        if temperature is None or not self.label_logprobs:
            return self
        probs = dict(zip(LABELS, calibration.apply(self.label_logprobs, temperature), strict=True))
        return replace(self, probs=probs, temperature=temperature)

    def response_prefix(self) -> str:
        """The standard response up to the advice, stating this importance, label and reaction."""
        return render_response_prefix(self.label, self.importance, self.market_reaction)

    def agrees_with(self, text: str) -> bool:
        """Whether ``text`` states this label and states no other importance or market reaction."""
        stated = parse_response(text)
        return (
            stated.label == self.label
            and stated.star in (None, self.importance)
            and stated.reaction in (None, self.market_reaction)
        )


PEFT_ADAPTER_NAMES_HOOK = "_adapter_names_pre_forward_hook"  # peft.tuners.lora.model


@contextmanager
def mixed_batch(model: Any) -> Iterator[None]:
    """Around a forward pass or ``generate`` given ``adapter_names``. peft registers the hooks that hand each LoRA
    layer the names without try/finally (huggingface/peft#3475), so a pass that raises (out of GPU memory on a busy
    card, say) leaves them on the model, and every later pass fails on the stale names ("Length of
    `adapter_names` should be the same as the number of inputs"). This removes them when the pass raises."""
    try:
        yield
    except BaseException:
        for module in model.modules():
            hooks = module._forward_pre_hooks
            for key in [
                k
                for k, hook in hooks.items()
                if getattr(hook, "func", None) is not None and hook.func.__name__ == PEFT_ADAPTER_NAMES_HOOK
            ]:
                del hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
        raise


def _keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (computes the vocabulary logits of the last positions
    only); every transformers causal LM does, a PeftModel passes it on to its base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _attention_mask(allowed: torch.Tensor, model: Any) -> torch.Tensor:
    """A custom 4D mask (transformers passes it on as it is): boolean for sdpa and its kin, additive for eager."""
    mask = allowed.unsqueeze(1)
    if model.config._attn_implementation != "eager":
        return mask
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


@torch.no_grad()
def group_logprobs(
    model: Any,
    tokenizer: Any,
    items: Sequence[Sequence[Group]],
    adapter_names: Sequence[str] | None = None,
    graphs: ScoringGraphs | None = None,
) -> list[list[list[float]]]:
    """log P(candidate | context) for every candidate of every group of every item, in one forward pass.

    Each item is one row: its prompt once, then its candidates' token tree (``service.llm.token_tree``), each token
    attending to the prompt and its own ancestors only (a 4D mask) at its depth as position, so each sequence is
    computed exactly as if alone. Rows are left-padded and the nodes whose next-token distribution is read come
    last, so only the vocabulary logits of the last few positions are computed: with a 100k vocabulary, full logits
    of a batch would take tens of GB. ``adapter_names``: each item's adapter (peft's mixed batch). ``graphs``: this
    model's CUDA graphs (``service.llm.scoring_graphs``), which the pass replays where it can.
    """
    rows = encode_items(tokenizer, items)
    width = max(len(row.trunk) + len(row.branches.tokens) for row in rows)
    if graphs is not None:  # similar prompts share a graph
        width = -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    keep = max(row.branches.predicting for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # a padding place sees itself: no NaN
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for i, row in enumerate(rows):
        trunk, branches = len(row.trunk), row.branches
        first = width - trunk - len(branches.tokens)  # where the trunk starts; the branches start at first + trunk
        input_ids[i, first : first + trunk] = torch.tensor(row.trunk, dtype=torch.long)
        input_ids[i, first + trunk :] = torch.from_numpy(branches.tokens)
        positions[i, first : first + trunk] = torch.arange(trunk)
        positions[i, first + trunk :] = torch.from_numpy(branches.depths) + trunk
        allowed[i, first : first + trunk, first : first + trunk] = causal[:trunk, :trunk]
        allowed[i, first + trunk :, first : first + trunk] = True
        allowed[i, first + trunk :, first + trunk :] = torch.from_numpy(branches.ancestry)
    device = next(model.parameters()).device
    inputs = input_ids.to(device), _attention_mask(allowed, model).to(device), positions.to(device)
    logits = graphs.forward(model, *inputs, keep) if graphs is not None and adapter_names is None else None
    if logits is None:
        extra: dict[str, Any] = {"logits_to_keep": keep} if _keeps_logits(model) else {}
        if adapter_names is not None:
            extra["adapter_names"] = list(adapter_names)
        ids, mask, position_ids = inputs
        with mixed_batch(model):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **extra).logits
    logits = logits[:, -keep:]
    # every scored token as (row, kept place of the node that predicts it, token), gathered in one go
    which = np.concatenate([np.full(len(row.branches.targets), i) for i, row in enumerate(rows)])
    places = np.concatenate([keep - row.branches.predicting + row.branches.places for row in rows])
    targets = np.concatenate([row.branches.targets for row in rows])
    index = torch.from_numpy(which).to(device), torch.from_numpy(places).to(device)
    norms = torch.stack([torch.logsumexp(logits[i].float(), dim=-1) for i in range(len(rows))])  # row by row
    token_lp = logits[index + (torch.from_numpy(targets).to(device),)].float() - norms[index]
    running = np.concatenate([[0.0], np.cumsum(token_lp.double().cpu().numpy())])
    lengths = np.array([n for row in rows for n in row.branches.lengths], dtype=np.int64)  # per sequence, in order
    ends = np.cumsum(lengths)
    sums = iter((running[ends] - running[ends - lengths]).tolist())
    return [[[next(sums) for _ in options] for _, options in groups] for groups in items]


def continuation_logprobs(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    adapter_names: Sequence[str] | None = None,
) -> list[list[float]]:
    """log P(candidate | context) for every candidate of every context, in one batched forward pass."""
    items = [[(context, options)] for context, options in zip(contexts, candidates, strict=True)]
    return [groups[0] for groups in group_logprobs(model, tokenizer, items, adapter_names)]


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
        if isinstance(item, NewsItem):  # in the format its adapter was trained with (prompts.PROMPT_FORMATS)
            prompts.append(render_prompt(item.render(text), instruction, item.prompt_format, tokenizer))
        else:
            prompts.append(render_prompt(text, instruction))
    return prompts


ONE_PASS_MAX_TEXTS = ONE_PASS_ROWS  # up to this many texts (1), classify scores every stage in one pass; see there


def label_groups(prompt: str) -> list[Group]:
    """The stars, and the labels after each star."""
    label_words = [LABEL_WORDS[label] for label in LABELS]
    groups: list[Group] = [(prompt, [f"{STAR_PREFIX}{s}星级" for s in STARS])]
    return groups + [(prompt + LABEL_PREFIX_TEMPLATE.format(star=s), label_words) for s in STARS]


def reaction_group(prompt: str, star: int, label: Label) -> Group:
    """The reactions after a star (index into ``STARS``) and a label."""
    context = prompt + REACTION_PREFIX_TEMPLATE.format(star=STARS[star], label=LABEL_WORDS[label])
    return context, [REACTION_WORDS[r] for r in LABELS]


def _best(row: Sequence[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def classify(
    model: Any,
    tokenizer: Any,
    texts: Sequence[Text],
    instructions: Sequence[str] | None = None,
    adapter_names: Sequence[str] | None = None,
    graphs: ScoringGraphs | None = None,
) -> list[Prediction]:
    """Importance, label probabilities and market reaction for each text, by scoring the standard response
    (``adapter_names``: each text's adapter, for a mixed batch; ``graphs``: the model's CUDA graphs, see
    :func:`group_logprobs`).

    Greedy, stage by stage: the best star, the label probabilities after it, the best reaction after that star and
    label. One text takes one forward pass, its token tree holding the reactions after every star and label too.
    More texts take two: the stars and labels, then the reactions after the chosen star and label only, about half
    the tokens (padded to 64: 192 + 128 against 576 for a bench news item of ~20 tokens). Both are replayed from
    CUDA graphs at every batch size the batcher makes (``service.llm.scoring_graphs``), so what is left of a pass
    is its GPU work, which grows with the tokens: on an H200 (7B shape, ``bench/profile_label_gpu.py``, graphed) one
    text took 19.6 ms in one pass and 22.0 in two on the merged copy (the second pass's fixed cost), while at 2 to 4
    texts one pass computes 1.8x the tokens of two; two passes served 1.4x the requests/s of one at batches
    of ~55.
    """
    prompts = build_prompts(model, tokenizer, texts, instructions)
    one_pass = len(prompts) <= ONE_PASS_MAX_TEXTS
    every_reaction = [(star, label) for star in range(len(STARS)) for label in LABELS] if one_pass else []
    items = [label_groups(p) + [reaction_group(p, star, label) for star, label in every_reaction] for p in prompts]
    scores = group_logprobs(model, tokenizer, items, adapter_names, graphs)
    stars = [_best(item[0]) for item in scores]
    label_scores = [item[1 + star] for item, star in zip(scores, stars, strict=True)]
    labels = [LABELS[_best(row)] for row in label_scores]
    reactions: list[list[float]]
    if one_pass:
        after = 1 + len(STARS)  # the reaction groups follow the stars' group and one label group per star
        reactions = [
            item[after + every_reaction.index((star, label))]
            for item, star, label in zip(scores, stars, labels, strict=True)
        ]
    else:
        second = [[reaction_group(p, star, label)] for p, star, label in zip(prompts, stars, labels, strict=True)]
        reactions = [item[0] for item in group_logprobs(model, tokenizer, second, adapter_names, graphs)]
    return [
        Prediction(
            label=label,
            probs=dict(zip(LABELS, _softmax(row), strict=True)),
            importance=STARS[star],
            market_reaction=REACTION_WORDS[LABELS[_best(reaction)]],
            label_logprobs=tuple(row),
        )
        for star, row, label, reaction in zip(stars, label_scores, labels, reactions, strict=True)
    ]


def adapter_active(model: Any, name: str) -> AbstractContextManager[Any]:
    """Adapter ``name`` of ``model`` active while the returned context lasts (``BASE``: a PeftModel's adapters
    disabled; a model without adapters runs as it is)."""
    if name == BASE:
        return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()  # type: ignore[no-any-return]
    model.set_adapter(name)
    return nullcontext()


def left_padded(tokenizer: Any, prompts: Sequence[str], device: Any) -> Any:
    """A batch of prompts padded on the left, as greedy generation takes them, on ``device``."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, adapter_names: Sequence[str] | None = None
) -> list[str]:
    """Greedy continuations of a batch of prompts (left-padded), decoded without special tokens
    (``adapter_names``: each prompt's adapter, for a mixed batch). A model with a graph decoder attached
    (``service.llm.decoding``) decodes with it."""
    if max_new_tokens <= 0:
        return ["" for _ in prompts]
    batch = left_padded(tokenizer, prompts, next(model.parameters()).device)
    decoder = decoder_for(model) if adapter_names is None else None
    new_tokens = decoder.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens) if decoder else None
    if new_tokens is None:
        with mixed_batch(model):
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


def write_analyses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    predictions: Sequence[Prediction],
    max_new_tokens: int,
    free: Sequence[bool] | None = None,
    adapter_names: Sequence[str] | None = None,
) -> list[str]:
    """The analysis text of each scored prompt ("" with ``max_new_tokens`` 0): its response prefix filled with the
    prediction (:meth:`Prediction.response_prefix`: stars, label, reaction) followed by up to ``max_new_tokens``
    greedily generated tokens, so the text always states what was scored. ``free[i]``: prompt ``i`` is answered by
    free generation from the bare prompt instead, which may state something else (:meth:`Prediction.agrees_with`
    tells). One batch for both kinds (``adapter_names`` as :func:`generate`)."""
    if max_new_tokens <= 0:
        return ["" for _ in prompts]
    heads = ["" if free and free[i] else p.response_prefix() for i, p in enumerate(predictions)]
    texts = generate(
        model, tokenizer, [p + h for p, h in zip(prompts, heads, strict=True)], max_new_tokens, adapter_names
    )
    return [head + text for head, text in zip(heads, texts, strict=True)]


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
        self.add(value.reshape(-1).tolist())

    def add(self, tokens: list[int]) -> None:
        """The next generated tokens."""
        self.tokens.extend(int(t) for t in tokens)
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
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    on_text: Callable[[str], None],
    stop: threading.Event | None = None,
) -> int:
    """Greedy generation of one prompt, calling ``on_text`` with each new piece of text as its token is generated;
    stops early when ``stop`` is set. Returns the number of tokens generated. Same decoding as :func:`generate`."""
    from transformers import StoppingCriteriaList

    if max_new_tokens <= 0:
        return 0
    device = next(model.parameters()).device
    batch = tokenizer([prompt], return_tensors="pt").to(device)
    streamer = _TextStreamer(tokenizer, on_text)
    stopped = stop or threading.Event()
    decoder = decoder_for(model)
    if decoder is not None:

        def on_tokens(tokens: torch.Tensor) -> bool:
            streamer.add(tokens.tolist())
            return not stopped.is_set()

        new_tokens = decoder.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens, on_tokens)
        if new_tokens is not None:
            streamer.end()
            return int(new_tokens.shape[1])
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_StopWhenSet(stopped)]),
    )
    return int(output.shape[1] - batch["input_ids"].shape[1])
