"""Sampled generation for chat completions: temperature and top_p drawn with a seeded generator, stop strings, and
the log-probability of every generated token.

:func:`sample` runs transformers' ``generate`` (greedy) with a :class:`_Sampler` as its last logits processor. For each
new token the sampler reads the distribution ``generate`` hands it, records the log-probability of the token it
picks and of the most likely alternatives (``top_logprobs``), and picks: the most likely token at temperature 0,
else a draw from ``softmax(logits / temperature)`` cut to the smallest set of tokens whose probability reaches
``top_p``, made with the caller's ``torch.Generator`` (the same seed gives the same answer). It then leaves only that
token possible, so ``generate``'s own greedy step takes it. The log-probabilities are the model's (after the
model's own generation settings, such as a repetition penalty), before temperature and top_p.

:class:`_Text` turns the tokens into text as they come: it holds back what could still be the start of a stop
string, an incomplete character (a byte-level token can be part of a CJK character) and trailing whitespace, and
hands each safe new piece on with the log-probabilities of the tokens it completes. A stop string ends the answer
(it is not part of it). Answers are stripped of leading and trailing whitespace, as :func:`scoring.generate`'s are.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import torch

from service.llm.decoding import eos_ids


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature`` 0 is greedy; ``top_logprobs`` None gives no log-probabilities."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_logprobs: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Alternative:
    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability and the most likely tokens at its place."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[Alternative]


@dataclass
class Generated:
    text: str
    tokens: int  # generated, the end-of-text token included
    finish_reason: Literal["stop", "length"]
    logprobs: list[TokenLogprob] | None


Piece = Callable[[str, list[TokenLogprob]], None]  # a new piece of text and the logprobs of the tokens it completes


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE token spells each byte with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte fallback


def _byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer spells bytes with GPT-2's alphabet (a byte-level BPE: the built-in model's, Qwen's)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The UTF-8 bytes a token stands for (a byte-level token may be part of a character)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece:
        decoder = _byte_decoder()
        if _byte_level(tokenizer) and all(c in decoder for c in piece):
            return [decoder[c] for c in piece]
        if match := _BYTE_TOKEN.fullmatch(piece):
            return [int(match.group(1), 16)]
    return list(str(tokenizer.decode([token_id])).encode("utf-8"))


class _Text:
    """The answer's text as its tokens come (see the module): safe pieces out, stop strings cut."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], on_piece: Piece | None) -> None:
        self.tokenizer, self.stops, self.on_piece = tokenizer, tuple(stops), on_piece
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.ends: list[int] = []  # the text's length once each token was added
        self.logprobs: list[TokenLogprob] = []
        self.sent = 0  # characters handed on
        self.given = 0  # logprobs handed on
        self.text = ""
        self.stopped = False  # a stop string was found

    def add(self, token_id: int, logprob: TokenLogprob | None) -> None:
        self.ids.append(token_id)
        text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True)).lstrip()
        if logprob is not None:
            self.logprobs.append(logprob)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            self.text = text[: min(found)]
            return
        self.text = text
        self.ends.append(len(text))
        safe = len(text.rstrip()) if not text.endswith("\ufffd") else len(text) - 1
        self._hand_on(min(safe, len(text) - self.holdback))

    def _hand_on(self, upto: int) -> None:
        if upto <= self.sent or self.on_piece is None:
            return
        done = sum(1 for end in self.ends[self.given :] if end <= upto)
        piece, tokens = self.text[self.sent : upto], self.logprobs[self.given : self.given + done]
        self.sent, self.given = upto, self.given + len(tokens)
        self.on_piece(piece, tokens)

    def finish(self) -> str:
        """The whole answer; the rest of it is handed on."""
        self.text = self.text.rstrip()
        starts = [0, *self.ends]
        kept = sum(1 for start in starts[: len(self.logprobs)] if start < len(self.text))
        self.logprobs = self.logprobs[:kept]
        if self.on_piece is not None and (len(self.text) > self.sent or kept > self.given):
            self.on_piece(self.text[self.sent :], self.logprobs[self.given :])
        self.sent, self.given = len(self.text), kept
        return self.text


class _Sampler:
    """The last logits processor of ``generate``: picks each token (see the module) and feeds :class:`_Text`."""

    def __init__(self, tokenizer: Any, sampling: Sampling, generator: torch.Generator | None, text: _Text) -> None:
        self.tokenizer, self.sampling, self.generator, self.text = tokenizer, sampling, generator, text
        self.eos = set(eos_ids(tokenizer))
        self.count = 0
        self.ended = False  # an end-of-text token was picked

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.ended or self.text.stopped:  # generate may take one more step before it stops
            return scores
        logits = scores[0].float()
        token = self._pick(logits)
        self.count += 1
        if token in self.eos:
            self.ended = True
        else:
            logprobs = torch.log_softmax(logits, dim=-1) if self.sampling.top_logprobs is not None else None
            self.text.add(token, None if logprobs is None else self._logprob(logprobs, token))
        forced = torch.full_like(scores, float("-inf"))
        forced[0, token] = 0.0
        return forced

    def _pick(self, logits: torch.Tensor) -> int:
        if self.sampling.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1:
            ordered, order = probs.sort(descending=True)
            outside = ordered.cumsum(0) - ordered >= self.sampling.top_p  # the first token always stays
            probs = probs.scatter(0, order[outside], 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _logprob(self, logprobs: torch.Tensor, token: int) -> TokenLogprob:
        count = self.sampling.top_logprobs or 0
        values, ids = logprobs.topk(count) if count else (logprobs[:0], logprobs[:0].long())
        top = [self._alternative(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]
        chosen = self._alternative(token, float(logprobs[token]))
        return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes, top)

    def _alternative(self, token: int, logprob: float) -> Alternative:
        text = str(self.tokenizer.decode([token], skip_special_tokens=False))
        return Alternative(text, max(logprob, -9999.0), token_bytes(self.tokenizer, token))


@dataclass
class _Halt:
    """A stopping criterion: stop once a stop string was found or ``event`` is set (the client went away)."""

    text: _Text
    event: threading.Event = field(default_factory=threading.Event)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        halt = self.text.stopped or self.event.is_set()
        return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    sampling: Sampling,
    generator: torch.Generator | None = None,
    on_piece: Piece | None = None,
    stop: threading.Event | None = None,
) -> Generated:
    """One answer to ``prompt`` of at most ``max_new_tokens`` (see the module); ``on_piece`` gets each safe new piece
    of text as it is generated; setting ``stop`` ends the generation at its next token."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    text = _Text(tokenizer, sampling.stop, on_piece)
    sampler = _Sampler(tokenizer, sampling, generator, text)
    halt = _Halt(text, stop or threading.Event())
    if max_new_tokens > 0:
        batch = tokenizer([prompt], return_tensors="pt").to(next(model.parameters()).device)
        model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([halt]),
        )
    content = text.finish()
    stopped_early = sampler.ended or text.stopped or halt.event.is_set()
    reason: Literal["stop", "length"] = "length" if sampler.count >= max_new_tokens and not stopped_early else "stop"
    return Generated(content, sampler.count, reason, text.logprobs if sampling.top_logprobs is not None else None)


def new_generator(device: Any, seed: int | None) -> torch.Generator:
    """A generator on ``device``, seeded with ``seed`` (None: from the operating system's randomness)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
