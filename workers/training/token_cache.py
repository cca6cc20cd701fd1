"""Tokenised training rows, cached per dataset and tokenizer, so a retried, resumed or repeated job skips it.

A row is ``(input_ids, labels)`` for prompt + response + EOS, untruncated; labels are -100 over the prompt so the
loss covers the response only. The cache key hashes the examples themselves, the prompt template and the
tokenizer's full definition, so any change to one of them misses the cache instead of training on stale ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from service.llm.prompts import Example, render_prompt

Row = tuple[list[int], list[int]]
FORMAT_VERSION = 1


def tokenize_one(example: Example, tokenizer: Any, prompt_format: str = "flashtune") -> Row:
    prompt = render_prompt(example.input, example.instruction, prompt_format, tokenizer)
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + example.output)["input_ids"] + [tokenizer.eos_token_id]
    # The prompt's last token may merge with the response's first; the loss starts where the two first differ.
    boundary = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b), len(prompt_ids))
    return ids, [-100] * boundary + ids[boundary:]


def cache_key(examples: list[Example], tokenizer: Any, prompt_format: str = "flashtune") -> str:
    template = render_prompt("{input}", "{instruction}", prompt_format, tokenizer)
    digest = hashlib.sha256(f"v{FORMAT_VERSION}|{template}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    digest.update(f"|eos={tokenizer.eos_token_id}|".encode())
    for e in examples:
        digest.update(json.dumps([e.instruction, e.input, e.output], ensure_ascii=False).encode())
    return digest.hexdigest()[:32]


def tokenize_cached(
    examples: list[Example], tokenizer: Any, cache_dir: Path | None, prompt_format: str = "flashtune"
) -> list[Row]:
    """Rows of ``examples`` in order, from ``cache_dir`` when this dataset was tokenised the same way before
    (``prompt_format``: how the prompts are written, service/llm/prompts.py)."""
    if cache_dir is None:
        return [tokenize_one(e, tokenizer, prompt_format) for e in examples]
    path = cache_dir / f"{cache_key(examples, tokenizer, prompt_format)}.json"
    try:
        return [(ids, labels) for ids, labels in json.loads(path.read_text())]
    except (OSError, ValueError):
        pass  # missing or damaged: tokenise again and rewrite it
    rows = [tokenize_one(e, tokenizer, prompt_format) for e in examples]
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as out:
        json.dump(rows, out, separators=(",", ":"))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return rows
