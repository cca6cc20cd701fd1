"""Token lengths of the user's seed instructions, for the GPU benchmark (which cannot read ``../shared``).

Writes ``bench/seed_lengths.json``: for each of the 300 seed instructions, the prompt length and the full length
(prompt + response + EOS) in tokens of the built-in byte-level BPE tokenizer (``service.llm.builtin.model``), which
splits every CJK character into its own token, as the DeepSeek tokenizer mostly does for this text. Run it on
the CPU machine: ``python bench/seed_lengths.py``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from service.llm.builtin.model import builtin_tokenizer
from service.llm.prompts import render_prompt

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT.parent / "shared" / "data" / "seed" / "instructions.jsonl"
OUT = Path(__file__).resolve().parent / "seed_lengths.json"


def main() -> None:
    tokenizer = builtin_tokenizer()
    rows = [json.loads(line) for line in SEED.read_text(encoding="utf-8").splitlines() if line.strip()]
    lengths = []
    for row in rows:
        prompt = render_prompt(row.get("input", ""), row["instruction"])
        prompt_len = len(tokenizer(prompt)["input_ids"])
        full_len = len(tokenizer(prompt + row["output"])["input_ids"]) + 1  # + EOS
        lengths.append([prompt_len, full_len])
    full = [f for _, f in lengths]
    summary = {
        "source": "../shared/data/seed/instructions.jsonl",
        "tokenizer": "built-in byte-level BPE (service.llm.builtin.model.builtin_tokenizer, vocab 2048)",
        "count": len(lengths),
        "mean_tokens": round(statistics.mean(full), 1),
        "median_tokens": statistics.median(full),
        "max_tokens": max(full),
        "lengths": lengths,
    }
    OUT.write_text(json.dumps(summary) + "\n")
    print({k: v for k, v in summary.items() if k != "lengths"})


if __name__ == "__main__":
    main()
