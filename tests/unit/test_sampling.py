"""Sampled generation's parts (service/llm/sampling.py): the text handed on as tokens come (stop strings cut, held
back while they may still be starting, logprobs with the piece that completes their token), the token choice
(greedy at temperature 0, reproducible from a seed, top_p cutting the tail) and a token's bytes."""

from __future__ import annotations

import torch

from service.llm.sampling import Sampling, TokenLogprob, _Sampler, _Text, new_generator, token_bytes


class VocabTokenizer:
    """Token i is ``VOCAB[i]``; the last one ends the text."""

    VOCAB = ["ab", "cE", "ND", "x", " ", "中", "\n", "</s>"]
    eos_token_id = len(VOCAB) - 1

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.VOCAB[i] for i in ids if not (skip_special_tokens and i == self.eos_token_id))

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.VOCAB[token_id]


TOKENIZER = VocabTokenizer()


def _logprob(i: int) -> TokenLogprob:
    return TokenLogprob(TOKENIZER.VOCAB[i], -0.5, [], [])


def _run(ids: list[int], stops: tuple[str, ...]) -> tuple[str, list[tuple[str, list[str]]], list[str]]:
    pieces: list[tuple[str, list[str]]] = []
    text = _Text(TOKENIZER, stops, lambda piece, logprobs: pieces.append((piece, [t.token for t in logprobs])))
    for i in ids:
        if not text.stopped:
            text.add(i, _logprob(i))
    return text.finish(), pieces, [t.token for t in text.logprobs]


def test_a_stop_string_ends_the_answer_and_is_held_back_until_it_is_decided() -> None:
    final, pieces, logprobs = _run([0, 1, 2, 3], ("END",))
    assert final == "abc"
    assert pieces == [("ab", ["ab"]), ("c", ["cE"])]  # "E" could have started "END": held back, then cut
    assert logprobs == ["ab", "cE"]  # the token that only spelled the stop string is not the answer's


def test_without_a_stop_string_the_pieces_join_up_to_the_stripped_answer() -> None:
    final, pieces, logprobs = _run([6, 4, 0, 4, 5, 4, 6], ())
    assert final == "ab 中" and "".join(p for p, _ in pieces) == final
    assert pieces[0] == ("ab", ["\n", " ", "ab"])  # the leading whitespace's tokens come with the first text
    assert logprobs == ["\n", " ", "ab", " ", "中"]  # trailing whitespace is not part of the answer


def _sampler(sampling: Sampling, seed: int | None = None) -> _Sampler:
    text = _Text(TOKENIZER, (), None)
    return _Sampler(TOKENIZER, sampling, new_generator("cpu", seed), text)


def test_temperature_zero_is_greedy_and_a_seed_repeats_a_draw() -> None:
    logits = torch.tensor([0.1, 2.0, 1.9, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert {_sampler(Sampling())._pick(logits) for _ in range(5)} == {1}
    sampler = _sampler(Sampling(temperature=1.5), 7)
    repeated = [sampler._pick(logits) for _ in range(30)]
    again = _sampler(Sampling(temperature=1.5), 7)
    assert repeated == [again._pick(logits) for _ in range(30)]
    assert len(set(repeated)) > 1  # a temperature of 1.5 does not always pick the likeliest
    nucleus = _sampler(Sampling(temperature=1.5, top_p=0.01), 7)
    assert {nucleus._pick(logits) for _ in range(30)} == {1}  # top_p keeps only the likeliest token here


def test_the_sampler_records_the_chosen_token_and_its_alternatives() -> None:
    sampler = _sampler(Sampling(top_logprobs=2))
    scores = torch.tensor([[0.1, 2.0, 1.9, 0.0, 0.0, 0.0, 0.0, 0.0]])
    forced = sampler(torch.zeros((1, 3), dtype=torch.long), scores)
    assert int(forced[0].argmax()) == 1 and torch.isinf(forced[0]).sum() == 7
    chosen = sampler.text.logprobs[0]
    assert chosen.token == "cE" and [a.token for a in chosen.top] == ["cE", "ND"]
    assert abs(chosen.logprob - float(torch.log_softmax(scores[0], -1)[1])) < 1e-6


def test_a_byte_level_token_is_given_as_its_bytes() -> None:
    from service.llm.builtin.model import _train_tokenizer

    tokenizer = _train_tokenizer(["这是一条财经快讯 hello", "美联储加息"])
    for text in ("中", "hello", "快"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert b"".join(bytes(token_bytes(tokenizer, i)) for i in ids) == text.encode()
