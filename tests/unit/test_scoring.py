"""Tree scoring is exact: one forward pass over an item's token tree gives each candidate the log-probability it
has when its sequence is run alone, and ``classify`` reads the stages as scoring them one after another would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from service.llm.prompts import LABEL_PREFIX_TEMPLATE, LABEL_WORDS, LABELS, REACTION_PREFIX_TEMPLATE, REACTION_WORDS
from service.llm.scoring import (
    ONE_PASS_MAX_TEXTS,
    STAR_PREFIX,
    STARS,
    Prediction,
    build_prompts,
    classify,
    continuation_logprobs,
    group_logprobs,
)
from service.llm.scoring_graphs import ROW_BUCKETS, ScoringGraphs, row_bucket, same_pass

TEXTS = ["美联储宣布降息25个基点，市场预期进一步宽松", "某公司季度亏损扩大，股价盘前下跌", "Oil output steady 🛢️"]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model_and_tokenizer(request: pytest.FixtureRequest, builtin_model_cache: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(builtin_model_cache, attn_implementation=request.param)
    return model.eval(), AutoTokenizer.from_pretrained(builtin_model_cache)


@torch.no_grad()
def alone(model: Any, tokenizer: Any, context: str, options: list[str]) -> list[float]:
    """Each candidate's sequence run by itself, unpadded, scored from where the candidates depart from the context."""
    ctx = tokenizer(context)["input_ids"]
    full = [tokenizer(context + o)["input_ids"] for o in options]
    shared = [next((i for i, (a, b) in enumerate(zip(ctx, f, strict=False)) if a != b), len(ctx)) for f in full]
    start = max(1, min(shared))
    out = []
    for ids in full:
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        out.append(float(sum(logprobs[j - 1, ids[j]] for j in range(start, len(ids)))))
    return out


def test_tree_scores_equal_sequences_alone(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = build_prompts(model, tokenizer, TEXTS)
    items = [
        [
            (p, [f"{STAR_PREFIX}{s}星级" for s in STARS]),
            (p + LABEL_PREFIX_TEMPLATE.format(star=2), ["利好", "利空", "中性"]),
        ]
        for p in prompts
    ]
    got = group_logprobs(model, tokenizer, items)
    for item, scores in zip(items, got, strict=True):
        for (context, options), row in zip(item, scores, strict=True):
            assert row == pytest.approx(alone(model, tokenizer, context, list(options)), abs=2e-4)
    # one group per context is the plain candidate scoring the OpenAI route's guided_choice uses
    assert continuation_logprobs(model, tokenizer, prompts[:1], [["是", "否"]])[0] == pytest.approx(
        alone(model, tokenizer, prompts[0], ["是", "否"]), abs=2e-4
    )


def test_tokenised_whole_where_the_prompt_does_not_end_at_a_token_boundary(
    model_and_tokenizer: tuple[Any, Any],
) -> None:
    """A context ending mid-number: a candidate merges with its last character ("1" + "0" is the token "10"), so
    the item is tokenised sequence by sequence (the fallback), and still scores as the sequences alone do."""
    model, tokenizer = model_and_tokenizer
    context, options = "美联储利率为1", ["0", "5", "点"]
    joined = tokenizer(context + options[0])["input_ids"]
    assert joined != tokenizer(context)["input_ids"] + tokenizer(options[0], add_special_tokens=False)["input_ids"]
    got = continuation_logprobs(model, tokenizer, [context, "利好消息"], [options, ["利好", "中性"]])
    assert got[0] == pytest.approx(alone(model, tokenizer, context, options), abs=2e-4)
    assert got[1] == pytest.approx(alone(model, tokenizer, "利好消息", ["利好", "中性"]), abs=2e-4)


@pytest.mark.parametrize("texts", [TEXTS[:1], TEXTS * 2], ids=["one-pass", "two-passes"])
def test_classify_reads_the_stages_in_turn(model_and_tokenizer: tuple[Any, Any], texts: list[str]) -> None:
    """One text is scored in one pass, more in two (``ONE_PASS_MAX_TEXTS``); either reads the stages in turn."""
    model, tokenizer = model_and_tokenizer
    assert (len(texts) <= ONE_PASS_MAX_TEXTS) == (len(texts) == 1)
    prompts = build_prompts(model, tokenizer, texts)
    for prompt, got in zip(prompts, classify(model, tokenizer, texts), strict=True):
        stars = alone(model, tokenizer, prompt, [f"{STAR_PREFIX}{s}星级" for s in STARS])
        star = STARS[max(range(len(STARS)), key=stars.__getitem__)]
        words = [LABEL_WORDS[label] for label in LABELS]
        labels = alone(model, tokenizer, prompt + LABEL_PREFIX_TEMPLATE.format(star=star), words)
        label = LABELS[max(range(3), key=labels.__getitem__)]
        reactions = alone(
            model,
            tokenizer,
            prompt + REACTION_PREFIX_TEMPLATE.format(star=star, label=LABEL_WORDS[label]),
            [REACTION_WORDS[r] for r in LABELS],
        )
        assert (got.importance, got.label) == (star, label)
        assert got.market_reaction == REACTION_WORDS[LABELS[max(range(3), key=reactions.__getitem__)]]
        total = torch.logsumexp(torch.tensor(labels), 0)
        assert [got.probs[lab] for lab in LABELS] == pytest.approx(
            [float(torch.exp(v - total)) for v in labels], abs=1e-4
        )


class _EagerReplay:
    """Stands in for a CUDA graph on the CPU: replaying reruns the recorded function into the same output buffer,
    reading the same static inputs, as a graph's replay does."""

    def __init__(self, run: Any) -> None:
        self.run, self.out = run, run()

    def replay(self) -> None:
        self.out.copy_(self.run())


class _CpuGraphs(ScoringGraphs):
    def _capture(self, run: Any) -> tuple[Any, torch.Tensor]:
        graph = _EagerReplay(run)
        return graph, graph.out


def _assert_same(got: list[Prediction], expected: list[Prediction]) -> None:
    """The same reading; probabilities to 1e-5 (padded rows change the matrix shapes, so the last bits may differ)."""
    assert [(p.label, p.importance, p.market_reaction) for p in got] == [
        (p.label, p.importance, p.market_reaction) for p in expected
    ]
    for a, b in zip(got, expected, strict=True):
        assert a.probs == pytest.approx(b.probs, abs=1e-5)


def test_graphed_scoring_pads_to_buckets_and_replays_new_inputs(model_and_tokenizer: tuple[Any, Any]) -> None:
    """With graphs, rows are padded to a width bucket and each call copies its inputs into the captured ones: a
    second text of the same bucket replays the first one's graph and still gets its own scores."""
    model, tokenizer = model_and_tokenizer
    graphs = _CpuGraphs()
    _assert_same(classify(model, tokenizer, TEXTS[:1], graphs=graphs), classify(model, tokenizer, TEXTS[:1]))
    captured = len(graphs)
    _assert_same(classify(model, tokenizer, TEXTS[1:2], graphs=graphs), classify(model, tokenizer, TEXTS[1:2]))
    assert len(graphs) == captured == 1
    few = _CpuGraphs(max_rows=4)  # more rows than the bucket of max_rows: eager
    assert len(classify(model, tokenizer, TEXTS * 2, graphs=few)) == 6 and len(few) == 0


def test_row_buckets() -> None:
    """A graphed batch's rows are padded up to the next bucket, up to the bucket that holds ``max_rows`` (the
    batcher's batch_max_size); a width is wanted at every bucket of its pass (one text: one pass, more: two)."""
    assert ROW_BUCKETS == (1, 2, 4, 8, 16, 32, 64) and ONE_PASS_MAX_TEXTS == 1
    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17, 33, 64, 65)] == [1, 2, 4, 8, 8, 16, 32, 64, 64, None]
    assert [row_bucket(n, max_rows=32) for n in (24, 32, 33)] == [32, 32, None]
    assert [row_bucket(n, max_rows=20) for n in (20, 32, 33)] == [32, 32, None]  # the bucket that holds 20 rows
    assert same_pass(1, 32) == [1] and same_pass(8, 32) == same_pass(2, 32) == [2, 4, 8, 16, 32]


def test_deferred_graphs_never_capture_in_a_pass(model_and_tokenizer: tuple[Any, Any]) -> None:
    """With ``defer`` a pass runs eagerly and only remembers its shape, at every row bucket of its pass;
    ``capture_next`` captures them one by one from placeholder inputs; then batches of that width replay (3 rows
    padded to 4) and score as eagerly. Dropping the graphs (``invalidate``) keeps the shapes to capture again."""
    model, tokenizer = model_and_tokenizer
    graphs = _CpuGraphs(defer=True, max_rows=4)
    texts = [TEXTS[0]] * 4
    eager = classify(model, tokenizer, texts[:3])
    _assert_same(classify(model, tokenizer, texts[:1], graphs=graphs), eager[:1])  # one pass: 1 row
    _assert_same(classify(model, tokenizer, texts[:3], graphs=graphs), eager)  # two passes: 2 and 4 rows
    wanted = 1 + 2 * 2
    assert len(graphs) == 0 and graphs.pending == wanted
    captured = 0
    while graphs.capture_next(model):
        captured += 1
    assert captured == len(graphs) == wanted and graphs.pending == 0
    for rows in (1, 2, 3, 4):
        _assert_same(classify(model, tokenizer, texts[:rows], graphs=graphs), eager[:1] * rows)
    assert len(graphs) == wanted and graphs.pending == 0  # nothing new wanted: every pass replayed
    graphs.invalidate()
    assert len(graphs) == 0 and graphs.pending == wanted
    other = _CpuGraphs(defer=True)  # another state of the model (an adapter) takes the shapes over
    for key, spec, keep in graphs.shapes():
        other.want(key, spec, keep)
    assert other.pending == wanted


class _CountingGraphs(_CpuGraphs):
    """Counts replays: which passes took the graphed path."""

    replays = 0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        logits = super().forward(*args, **kwargs)
        self.replays += logits is not None
        return logits


def test_large_batches_replay_graphs_and_ignore_the_padded_rows(model_and_tokenizer: tuple[Any, Any]) -> None:
    """Batches of 5 to 32 texts (the micro-batcher's default batch_max_size) take the graphed path in both passes,
    padded up to 8, 16 or 32 rows; the padded rows hold what an earlier, larger batch of that bucket left there
    (other texts) and change nothing: every batch scores as it does eagerly."""
    model, tokenizer = model_and_tokenizer
    texts = [f"{TEXTS[i % 3]} 第{i}条" for i in range(32)]
    graphs = _CountingGraphs(max_rows=32)
    for rows in (32, 8, 5, 16, 12):  # 5 replays the graph of 8 after 8 texts: its padded rows hold texts 5 to 7
        before = graphs.replays
        _assert_same(classify(model, tokenizer, texts[:rows], graphs=graphs), classify(model, tokenizer, texts[:rows]))
        assert graphs.replays - before == 2  # both passes replayed
    assert len(graphs) == 2 * 3  # both passes at 8, 16 and 32 rows


def test_a_failed_mixed_batch_leaves_the_model_usable(builtin_model_cache: Path) -> None:
    """A mixed-adapter pass that runs out of memory must not leave peft's ``adapter_names`` hooks behind
    (huggingface/peft#3475): the next, smaller mixed batch scores as each adapter alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.llm.scoring import BASE, adapter_active

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_cache)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(builtin_model_cache), config)
    model.add_adapter("other", config)
    model.eval()
    items = [[(text, [LABEL_WORDS[label] for label in LABELS])] for text in TEXTS]

    def out_of_memory(module: Any, args: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = model.get_base_model().model.embed_tokens.register_forward_pre_hook(out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        group_logprobs(model, tokenizer, items, ["default", "other", BASE])
    handle.remove()
    assert not any(m._forward_pre_hooks for m in model.modules())

    with torch.no_grad():
        mixed = group_logprobs(model, tokenizer, items[:2], ["other", BASE])
        with adapter_active(model, "other"):
            other = group_logprobs(model, tokenizer, items[:1])
        with adapter_active(model, BASE):
            base = group_logprobs(model, tokenizer, items[1:2])
    flat = [score for item in mixed for group in item for score in group]
    assert flat == pytest.approx([score for item in other + base for group in item for score in group], abs=1e-4)
