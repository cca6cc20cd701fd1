"""The worker's format check after training, on the GPU machine: 96 tokens for 16 held-out prompts with the base and
16 with the adapter, written as before (one ``generate`` over the mixed batch, each row naming its adapter) and as
now (``workers.training.evaluation.write_each``: one adapter at a time, each step a CUDA graph), in the same process.

    export PYTHONPATH=$PWD/.devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python3 bench/evaluate_gpu.py --checkpoint /tmp/ck/deepseek-7b-shaped --out $OUT

The base is the randomly initialised DeepSeek-LLM-7B-shaped checkpoint in NF4 (the worker's load), the adapter a
q/v r 8 LoRA whose B matrices are set to small random values, so that base and adapter write different tokens.
Prompts are the seed instructions' first 16. Prints seconds per way (the first call captures the graphs) and how
many rows' token ids equal those of a third way, the reference for exactness: ``generate`` one adapter at a time,
the same batches as ``write_each`` (a different batch, as in the mixed way, may flip a near tie in bf16). Token ids,
not text: the random model mostly writes ids the built-in tokenizer decodes to nothing. Last, an experiment the
worker does not adopt (docs/benchmarks.md, session 8): the graph-decoded way again with the NF4 weights kept
dequantised (``service.llm.nf4.keep_dense_copies``, as serving keeps them), and how many rows' ids it shares with the
graph-decoded way on the packed weights (for a few rows per step bitsandbytes multiplies with a fused 4-bit
kernel, which rounds differently).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.job_api_gpu import build  # noqa: E402
from service.datasets.formats import parse  # noqa: E402
from service.jobs.hyperparameters import Hyperparameters, resolve  # noqa: E402
from service.llm.modeling import load_model, load_tokenizer, plan_load  # noqa: E402
from service.llm.nf4 import keep_dense_copies, nf4_layers  # noqa: E402
from service.llm.scoring import BASE, adapter_active, build_prompts, generate  # noqa: E402
from workers.training.evaluation import GENERATED_SAMPLES, write_each  # noqa: E402
from workers.training.recipe import attach_lora  # noqa: E402

NEW_TOKENS = 96


def timed(fn: Callable[[], list[str]]) -> tuple[float, list[str]]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started, out


class _Ids:
    """The tokenizer, except that a decoded batch is each row's token ids (as text): answers compare by id."""

    def __init__(self, tokenizer: Any) -> None:
        object.__setattr__(self, "_tokenizer", tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:  # left_padded() sets the padding side
        setattr(self._tokenizer, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def batch_decode(self, ids: torch.Tensor, **kwargs: Any) -> list[str]:
        return [str(row) for row in ids.tolist()]


def _each_generate(model: Any, tokenizer: Any, prompts: list[str], names: list[str]) -> list[str]:
    """``generate`` one adapter (or the base) at a time, batched as ``write_each`` batches them."""
    out: dict[int, str] = {}
    for name in dict.fromkeys(names):
        indices = [i for i, n in enumerate(names) if n == name]
        with adapter_active(model, name):
            out.update(zip(indices, generate(model, tokenizer, [prompts[i] for i in indices], NEW_TOKENS), strict=True))
    return [out[i] for i in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default=".devsite/seed/instructions.jsonl")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    build(checkpoint, tiny=False)
    plan = plan_load("cuda", "auto")
    tokenizer = load_tokenizer(str(checkpoint))
    model = attach_lora(load_model(str(checkpoint), plan), resolve(Hyperparameters(), str(checkpoint)), plan)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    model.eval()
    examples = parse(Path(args.dataset).read_bytes()).examples
    chosen = examples[:GENERATED_SAMPLES]
    prompts = build_prompts(model, tokenizer, [e.input for e in chosen], [e.instruction for e in chosen])
    names = [BASE] * len(prompts) + [model.active_adapter] * len(prompts)
    with torch.no_grad():
        report = compare_ways(model, _Ids(tokenizer), prompts * 2, names)
    print(json.dumps({k: v for k, v in report.items() if not k.endswith("_answers")}), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "evaluate_gpu.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))


def compare_ways(model: Any, ids: _Ids, prompts: list[str], names: list[str]) -> dict[str, Any]:
    """Each way twice (the first call captures the graphs), then the what-if of the dense copies; the report."""
    report: dict[str, Any] = {"rows": len(prompts), "new_tokens": NEW_TOKENS}
    ways: list[tuple[str, Callable[[], list[str]]]] = [
        ("mixed_generate", lambda: generate(model, ids, prompts, NEW_TOKENS, names)),
        ("each_generate", lambda: _each_generate(model, ids, prompts, names)),
        ("write_each_graphs", lambda: write_each(model, ids, prompts, names, NEW_TOKENS)),
    ]
    for way, fn in ways:
        first, _ = timed(fn)
        second, answers = timed(fn)
        report[way] = {"first_s": round(first, 2), "second_s": round(second, 2)}
        report[f"{way}_answers"] = answers
        print(way, report[way], flush=True)
    # What-if: the NF4 weights kept dequantised, as serving keeps them (service/llm/nf4.py); not what the job does.
    report["dense_copies_kept"] = keep_dense_copies(nf4_layers(model), torch.cuda.mem_get_info()[0])
    dense: dict[str, float] = {}
    for attempt in ("first_s", "second_s"):
        seconds, dense_answers = timed(ways[2][1])
        dense[attempt] = round(seconds, 2)
    report["write_each_graphs_dense"] = dense
    print("write_each_graphs_dense", dense, flush=True)
    now = report["write_each_graphs_answers"]
    report["rows_dense_equal_to_write_each"] = sum(a == b for a, b in zip(dense_answers, now, strict=True))
    for way in ("mixed_generate", "each_generate"):
        report[f"rows_equal_to_{way}"] = sum(a == b for a, b in zip(report[f"{way}_answers"], now, strict=True))
    second_s = report["mixed_generate"]["second_s"] / report["write_each_graphs"]["second_s"]
    report["speedup_second_call"] = round(second_s, 2)
    return report


if __name__ == "__main__":
    main()
