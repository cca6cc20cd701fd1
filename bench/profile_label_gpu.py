"""Where the time of one label-only /analyze goes, at batch 1, on the GPU.

    export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python bench/profile_label_gpu.py --out $OUT      # the checkpoint and adapter of bench/analyze_gpu.py

For the NF4 base with an adapter attached and for the merged bf16 copy it prints the median of:
``ModelServer.analyze`` (what the latency figure of analyze_gpu.py measures); ``scoring.classify`` alone (one
pass over every stage's candidates), eager and replaying CUDA graphs (``service.llm.scoring_graphs``); the same
scoring in two graphed passes (stars and labels, then reactions), as classify does for larger batches; the
tokenisation into token trees (``token_tree.encode_items``); and plain forward passes of the same number of tokens:
causal without a mask, and with a custom 4D mask (the tree's), so the cost of the mask shows. It writes a
``torch.profiler`` table of the classify calls (ops by CUDA time) to ``profile_label_<name>.txt``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.analyze_gpu import build, make_adapters, sync, texts_for  # noqa: E402
from service.core.config import Settings  # noqa: E402
from service.core.layout import AdapterRef  # noqa: E402
from service.llm.prompts import LABELS, STARS  # noqa: E402
from service.llm.scoring import build_prompts, classify, group_logprobs, label_groups, reaction_group  # noqa: E402
from service.llm.scoring_graphs import ScoringGraphs  # noqa: E402
from service.llm.token_tree import encode_items  # noqa: E402
from service.serving.engine import ModelServer  # noqa: E402


def median_ms(fn: Callable[[], Any], repeats: int = 20) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples), 2)


def measure(server: ModelServer, adapter: AdapterRef, texts: list[str], out: Path, name: str) -> dict[str, Any]:
    report: dict[str, Any] = {"analyze_ms": median_ms(lambda: server.analyze([texts[0]], adapter, 0))}

    graphs, two_pass_graphs = ScoringGraphs(), ScoringGraphs()

    @torch.no_grad()
    def inside(model: Any, tokenizer: Any) -> None:
        prompt = build_prompts(model, tokenizer, texts[:1])[0]
        first = [label_groups(prompt)]
        every = [first[0] + [reaction_group(prompt, s, lab) for s in range(len(STARS)) for lab in LABELS]]

        def two_passes() -> None:  # as classify scores more than ONE_PASS_MAX_TEXTS texts
            group_logprobs(model, tokenizer, first, graphs=two_pass_graphs)
            group_logprobs(model, tokenizer, [[reaction_group(prompt, 0, "neutral")]], graphs=two_pass_graphs)

        rows = encode_items(tokenizer, every)
        width = len(rows[0].trunk) + len(rows[0].branches.tokens)
        keep = rows[0].branches.predicting
        ids = torch.randint(1000, 2000, (1, width), device="cuda")
        mask = torch.ones((1, 1, width, width), dtype=torch.bool, device="cuda").tril()
        first_row = encode_items(tokenizer, first)[0]
        report.update(
            one_pass_tree_tokens=width,
            first_pass_tree_tokens=len(first_row.trunk) + len(first_row.branches.tokens),
            classify_ms=median_ms(lambda: classify(model, tokenizer, texts[:1])),
            classify_graphed_ms=median_ms(lambda: classify(model, tokenizer, texts[:1], graphs=graphs)),
            two_passes_graphed_ms=median_ms(two_passes),
            encode_items_ms=median_ms(lambda: encode_items(tokenizer, every)),
            forward_causal_ms=median_ms(lambda: model(input_ids=ids, logits_to_keep=keep)),
            forward_4d_mask_ms=median_ms(lambda: model(input_ids=ids, attention_mask=mask, logits_to_keep=keep)),
        )
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                classify(model, tokenizer, texts[:1])
            sync()
        averages = prof.key_averages()
        (out / f"profile_label_{name}.txt").write_text(
            averages.table(sort_by="cuda_time_total", row_limit=40)
            + "\n\n"
            + averages.table(sort_by="cpu_time_total", row_limit=30)
        )

    server.with_model(adapter, inside)
    print(name, json.dumps(report), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="/tmp/flashtune-bench/deepseek-7b-shaped")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out, checkpoint = Path(args.out), Path(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    build(checkpoint, tiny=False)
    data_dir = Path(tempfile.mkdtemp(prefix="flashtune-profile-"))
    adapter = make_adapters(checkpoint, data_dir / "adapters", 1)[0]
    texts = texts_for(8)
    settings: dict[str, Any] = dict(data_dir=data_dir, base_model=str(checkpoint), device="cuda", batch_wait_ms=2.0)
    report = {"nf4_attached": measure(ModelServer(Settings(**settings)), adapter, texts, out, "nf4")}
    merged = ModelServer(Settings(**settings, serve_merged=adapter.name))
    report["merged_bf16"] = measure(merged, adapter, texts, out, "merged")
    (out / "profile_label_gpu.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
