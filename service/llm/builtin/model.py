"""Build the embedded base model: a small Llama causal LM with its own byte-level tokenizer.

Nothing is downloaded. The tokenizer is a byte-level BPE, so it encodes any text (any script, emoji, control
characters) through its 256 byte tokens; CJK characters are split one by one before BPE so that the
tokenisation of a prompt plus a label is the concatenation of both. The model is then pretrained for a few
seconds on domain text in the response format with *random* labels: it learns the language and the format,
not the labelling rule, which is what a fine-tuning job has to teach it.

The result is saved in Hugging Face format and loaded with ``from_pretrained`` like any real model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock

from service.llm.builtin.data import generate
from service.llm.prompts import render_prompt

BUILTIN_NAME = "builtin"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
BUILD_SEED = 1234
VERSION = "1"  # bump when the recipe changes; a stale build is rebuilt


def builtin_path(data_dir: Path) -> Path:
    return data_dir / "models" / f"{BUILTIN_NAME}-v{VERSION}"


def ensure_builtin_model(data_dir: Path) -> Path:
    """Return the path of the built-in model, building it first if needed (safe across processes)."""
    path = builtin_path(data_dir)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / "config.json").exists():
            build(path)
    return path


def _corpus() -> list[str]:
    examples = generate(3000, seed=BUILD_SEED, labels="random")
    return [render_prompt(e.input, e.instruction) + e.output for e in examples]


def _train_tokenizer(corpus: list[str]):  # type: ignore[no-untyped-def]
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=512
    )


def builtin_tokenizer():  # type: ignore[no-untyped-def]
    """The built-in model's tokenizer, trained afresh (deterministic): the GPU benchmarks tokenise real text with it
    without building the model."""
    return _train_tokenizer(_corpus())


def build(path: Path, max_steps: int = 150) -> None:
    """Build tokenizer and model, pretrain briefly, and save atomically to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(BUILD_SEED)
    corpus = _corpus()
    tokenizer = _train_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    _pretrain(model, tokenizer, corpus, max_steps)

    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)  # atomic: a reader sees no model or a complete one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pretrain(model, tokenizer, corpus: list[str], max_steps: int) -> None:  # type: ignore[no-untyped-def]
    """Full-parameter language-model training on the corpus, a fixed number of steps (deterministic)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(BUILD_SEED)
    batch_size = 16
    for _ in range(max_steps):
        order = torch.randint(len(corpus), (batch_size,), generator=generator).tolist()
        texts = [corpus[i] + tokenizer.eos_token for i in order]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
