"""Padding-free packing is exact: a packed sample's loss equals its loss computed alone (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from workers.training.packing import (
    IGNORE,
    VARLEN,
    pack,
    pack_by_tokens,
    packed_loss,
    per_sample_losses,
    register_varlen_attention,
)


def tiny_llama(attn: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    register_varlen_attention()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def rows() -> list[tuple[list[int], list[int]]]:
    """Three samples of different lengths; the first few tokens of each are prompt (label -100)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for length, prompt in ((9, 4), (17, 6), (5, 2)):
        ids = torch.randint(3, 97, (length,), generator=gen).tolist()
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


@torch.no_grad()
def alone(model: torch.nn.Module, ids: list[int], labels: list[int]) -> float:
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), reduction="sum"))


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN])
def test_packed_loss_equals_unpacked(attn: str) -> None:
    model = tiny_llama(attn)
    samples = rows()
    batch = pack(samples)
    assert batch.position_ids[0].tolist() == [*range(9), *range(17), *range(5)]
    expected = [alone(model, ids, labels) for ids, labels in samples]
    got = per_sample_losses(model, batch)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # The whole-row loss the trainer uses is the sum of the per-sample losses over the target count.
    with torch.no_grad():
        total = float(packed_loss(model, batch, "cpu", denominator=batch.num_target_tokens))
    assert total == pytest.approx(sum(expected) / batch.num_target_tokens, rel=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", VARLEN])
def test_filler_padding_changes_nothing(attn: str) -> None:
    """Rounding the row length up with a filler sequence leaves every sample's loss as it was."""
    model = tiny_llama(attn)
    samples = rows()
    batch = pack(samples, pad_to_multiple=16)
    assert batch.num_tokens == 32 and batch.num_real_tokens == 31
    assert batch.position_ids[0, -1] == 0  # the filler starts its own sequence
    expected = [alone(model, ids, labels) for ids, labels in samples]
    assert per_sample_losses(model, batch) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_varlen_boundaries_are_what_separates_samples() -> None:
    """The varlen path has teeth too: one segment over the whole row lets later samples see earlier ones."""
    model = tiny_llama(VARLEN)
    samples = rows()
    batch = pack(samples)
    expected = [alone(model, ids, labels) for ids, labels in samples]
    batch.segments = lambda: [batch.num_tokens]  # type: ignore[method-assign]
    got = per_sample_losses(model, batch)
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    assert abs(got[1] - expected[1]) > 1e-3


@torch.no_grad()
def test_varlen_without_boundaries_is_sdpa() -> None:
    """Generation and batched scoring (left padding, a KV cache) run on the same model as plain sdpa."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    varlen, sdpa = tiny_llama(VARLEN), tiny_llama("sdpa")
    logits = [m(input_ids=ids, attention_mask=mask).logits for m in (varlen, sdpa)]
    assert torch.allclose(*logits, atol=1e-5)
    kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert varlen.generate(ids, **kwargs).tolist() == sdpa.generate(ids, **kwargs).tolist()


def test_without_restarting_positions_samples_leak() -> None:
    """The check has teeth: one continuous sequence (no restarts) gives different losses for later samples."""
    model = tiny_llama("sdpa")
    samples = rows()
    batch = pack(samples)
    batch.position_ids = torch.arange(batch.num_tokens).unsqueeze(0)
    expected = [alone(model, ids, labels) for ids, labels in samples]
    got = per_sample_losses(model, batch)
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    assert abs(got[1] - expected[1]) > 1e-3


def test_pack_by_tokens_balances_within_limit() -> None:
    samples = rows()
    batches = pack_by_tokens(samples, max_tokens=26)
    assert [b.lengths for b in batches] == [[9, 5], [17]]  # 14 and 17 tokens, not 26 and 5
    assert [b.lengths for b in pack_by_tokens(samples, max_tokens=31)] == [[9, 17, 5]]
    assert [b.lengths for b in pack_by_tokens(samples, max_tokens=10)] == [[9], [17], [5]]  # 17: a row of its own
    lengths = [150, 140, 130, 120, 160, 155, 145, 135, 125, 115, 165, 110]  # 1,650 tokens in 2 rows, not 3
    many = [([1] * n, [1] * n) for n in lengths]
    balanced = pack_by_tokens(many, max_tokens=900)
    assert len(balanced) == 2 and max(b.num_tokens for b in balanced) <= 900
    assert sorted(n for b in balanced for n in b.lengths) == sorted(lengths)
    assert all(b.labels[0, 0] == IGNORE for b in batches)
    assert sum(b.num_target_tokens for b in batches) == sum(sum(x != IGNORE for x in lab[1:]) for _, lab in samples)


def test_micro_batch_sized_to_free_memory() -> None:
    """The CUDA plan fits the 7B shape's whole optimizer step in one pass on an H200, not on a small card."""
    from types import SimpleNamespace

    from workers.training.cuda.plan import ACTIVATION_MARGIN, bytes_per_token, size_micro_batch

    shape = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, vocab_size=102400)
    gib = 2**30
    assert 5.0e6 < bytes_per_token(shape, False, True) / ACTIVATION_MARGIN < 5.3e6  # 5.2 MB/token measured (H200)
    assert size_micro_batch(shape, 135 * gib, 16 * 512, 512, True) == (16 * 512, False)
    tokens, checkpointing = size_micro_batch(shape, 11 * gib, 16 * 512, 512, True)  # a 16 GB card after loading
    assert 512 <= tokens < 16 * 512 and not checkpointing
    assert size_micro_batch(shape, 3 * gib, 16 * 512, 512, True)[1]  # not even one sample: checkpointing


def test_the_fused_cross_entropy_chunk_is_set_aside() -> None:
    """The fused cross-entropy's chunk of logits (512 rows x the vocabulary, bf16) comes off the free memory before
    the tokens are counted, not out of the reserve."""
    from types import SimpleNamespace

    from workers.training.cuda import plan

    shape = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, vocab_size=102400)
    free = 16 * 2**30
    per_token = plan.bytes_per_token(shape, False, True, fused_layers=True)
    chunk = 2 * plan.FUSED_CE_CHUNK_ROWS * shape.vocab_size
    expected = int((free * plan.USABLE_FRACTION - plan.RESERVE_BYTES - chunk) // per_token)
    assert plan.size_micro_batch(shape, free, 10**6, 512, True, fused_layers=True) == (expected, False)


def test_liger_layers_and_lora_modules_in_the_estimate() -> None:
    """Liger's layers keep fewer activations than transformers' (3.5 MB a token with q/v LoRA on the 7B shape, 3.5-3.6
    measured in session 14); every LoRA module adds its input and, with dropout, its mask."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from workers.training.cuda.plan import ACTIVATION_MARGIN, bytes_per_token, lora_saved_bytes

    shape = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, vocab_size=102400)
    q_v = 2 * 3 * 4096  # q_proj and v_proj: the dropped-out input (2 bytes) and its mask (1 byte) each
    fused = bytes_per_token(shape, False, True, fused_layers=True, lora_bytes=q_v) / ACTIVATION_MARGIN
    assert 3.4e6 < fused < 3.6e6 and fused < bytes_per_token(shape, False, True) / ACTIVATION_MARGIN

    def lora(dropout: float, targets: list[str]) -> float:
        model = get_peft_model(tiny_llama("eager"), LoraConfig(r=4, target_modules=targets, lora_dropout=dropout))
        return lora_saved_bytes(model, model.config.num_hidden_layers)

    config = tiny_llama("eager").config
    hidden, intermediate = config.hidden_size, config.intermediate_size
    assert lora(0.05, ["q_proj", "v_proj"]) == 2 * 3 * hidden
    assert lora(0.0, ["q_proj", "v_proj"]) == 2 * 2 * hidden
    assert lora(0.05, ["gate_proj", "down_proj"]) == 3 * hidden + 3 * intermediate


def test_token_cache_hits_and_misses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from service.llm.builtin.model import _corpus, _train_tokenizer
    from service.llm.prompts import Example
    from workers.training.token_cache import tokenize_cached, tokenize_one

    tokenizer = _train_tokenizer(_corpus()[:200])
    examples = [Example("分析", f"美国CPI 前值:{i}", f"这是一条{i}星级的财经快讯") for i in range(5)]
    first = tokenize_cached(examples, tokenizer, tmp_path)
    assert first == [tokenize_one(e, tokenizer) for e in examples] and len(list(tmp_path.iterdir())) == 1
    assert tokenize_cached(examples, tokenizer, tmp_path) == first  # read back from the file
    tokenize_cached(examples[:4], tokenizer, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # other examples: another entry, never the stale one


@torch.no_grad()
def test_graphed_decoder_computes_what_the_packed_forward_does() -> None:
    """What the CUDA graph records (workers.training.cuda.graphs), run eagerly on CPU: boundaries padded with empty
    segments and a fixed longest-segment bound give the packed forward's hidden states."""
    from workers.training.cuda.graphs import DecoderStack, GraphedDecoder
    from workers.training.packing import packed_forward_hidden

    model = tiny_llama(VARLEN)
    batch = pack(rows(), pad_to_multiple=48)  # 31 tokens of samples, 17 of filler
    decoder = GraphedDecoder(model, DecoderStack(model.model.layers, 48), 48, max_segments=6, device="cpu")
    assert decoder.bounds(batch).tolist() == [0, 9, 26, 31, 48, 48, 48]
    assert torch.allclose(decoder.hidden(batch), packed_forward_hidden(model, batch, "cpu"), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.bounds(pack(rows(), pad_to_multiple=16))  # 32 tokens: not the graph's row length


def test_balanced_row() -> None:
    """A step that needs several micro-batches gets rows of its balanced share plus one sample, not of all that fits."""
    from workers.training.cuda.plan import balanced_row

    assert balanced_row(3000, 2672, 300) == 2672  # the whole step in one row
    assert balanced_row(1700, 2672, 300) == 1336 + 300  # two rows of ~1,336, each at most one sample above
    assert balanced_row(1500, 2672, 300) == 1500  # balancing's bound is above what fits: what fits
    assert balanced_row(1300, 2672, 300) == 891 + 300  # three rows


def test_the_loss_skips_positions_without_a_target() -> None:
    """Only the positions that predict a target go through the output embedding: the loss and every gradient are
    those of the cross-entropy over the whole row with the others ignored; a row without targets costs 0."""
    model = tiny_llama("sdpa")
    batch = pack(rows(), pad_to_multiple=16)
    loss = packed_loss(model, batch, "cpu", denominator=batch.num_target_tokens)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0, :-1]
    whole = torch.nn.functional.cross_entropy(logits, batch.labels[0, 1:], ignore_index=IGNORE, reduction="sum")
    (whole / batch.num_target_tokens).backward()
    expected = [p.grad for p in model.parameters() if p.grad is not None]
    assert float(loss) == pytest.approx(float(whole) / batch.num_target_tokens, rel=1e-5)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    batch.labels.fill_(IGNORE)
    empty = packed_loss(model, batch, "cpu", denominator=0)
    empty.backward()
    assert float(empty) == 0.0
