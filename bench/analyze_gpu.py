"""GPU benchmark of FlashTune's serving path (``service.serving.engine.ModelServer`` and ``service.llm.scoring``).

On the H200 (no internet needed; about 4-6 minutes):

    export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python bench/analyze_gpu.py --out $OUT                       # --adapters 50 is the default
    python bench/analyze_gpu.py --tiny --adapters 4 --out /tmp/x  # smoke test on a CPU

It saves a randomly initialised DeepSeek-LLM-7B-shaped LlamaForCausalLM (hidden 4096, intermediate 11008, 30
layers, 32 heads, vocab 102400; ``bench/job_api_gpu.build`` -> ``bench/train_gpu.build_checkpoint``, bf16, built on
the GPU) with the built-in tokenizer, and ``--adapters`` random LoRA adapters (r 8 on q_proj/v_proj, peft's file
layout, safetensors) in a DATA_DIR. A ``ModelServer`` then loads the base as the API does (on CUDA ``plan_load``
with ``serve_quantization`` ``auto``: NF4, double quantisation, bf16 compute) and everything below goes through
FlashTune's own serving code:

  label-only latency   ``ModelServer.analyze`` of one text with ``max_new_tokens`` 0 (star, label, reaction
                       scored), p50/p95 over repeated calls
  generation           ``service.llm.scoring.generate`` (the analysis text of /analyze) of 64 new tokens at batch 1
                       and 32, tokens/s, against plain ``model.generate`` on the same model, same prompts, same
                       run (``ratio`` = FlashTune / HF); the graph decoder's tokens against its eagerly run step,
                       also across adapters (``attached_adapter_switching``)
  adapters             label-only requests/s through ``ModelServer.submit`` (the micro-batcher) from 64 threads:
                       1 adapter loaded; all ``--adapters`` loaded but one used; all loaded, requests mixing them
                       (their LoRA deltas gathered, ``service.serving.gathered_lora``, the default); with
                       ``--mixed-paths`` also the same mixed requests through peft's loop over the adapters
                       (``FLASHTUNE_GATHERED_LORA=false``), the two paths' answers on one mixed batch compared
                       (``gathered_exactness``) and the ratios of one run (``mixed_ratios``)
  merged               ``FLASHTUNE_SERVE_MERGED``: the adapter merged into a bf16 copy of the base; the same label
                       latency and generation figures, and the memory it costs

A random model never predicts its special tokens here (their output rows are zeroed after loading), so every
generation really produces 64 tokens. Texts are the built-in held-out news items. The JSON summary is printed
and written to ``--out``/analyze_gpu.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.job_api_gpu import build  # noqa: E402
from service.core.config import Settings  # noqa: E402
from service.core.layout import AdapterRef, adapter_name  # noqa: E402
from service.llm.decoding import GraphDecoder, decoder_for  # noqa: E402
from service.llm.scoring import build_prompts, generate, left_padded  # noqa: E402
from service.serving.engine import Item, ModelServer  # noqa: E402

NEW_TOKENS = 64
LORA_TARGETS = ["q_proj", "v_proj"]
THROUGHPUTS = (
    "throughput_1_loaded",
    "throughput_all_loaded_one_used",
    "throughput_all_loaded_mixed",
    "throughput_all_loaded_mixed_peft",
)


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gib() -> float | None:
    return round(torch.cuda.memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ set-up
def make_adapters(checkpoint: Path, adapters_dir: Path, count: int, r: int = 8) -> list[AdapterRef]:
    """``count`` random LoRA adapters in peft's layout, keys and shapes taken from peft on a meta-device copy."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(get_peft_model(skeleton, lora)).items()}
    del skeleton
    refs = []
    for i in range(count):
        folder = adapters_dir / adapter_name(i + 1)
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(i)
        tensors = {
            key: torch.randn(shape, generator=gen) * (shape[1] ** -0.5 if "lora_A" in key else 0.02)
            for key, shape in shapes.items()
        }
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        lora.save_pretrained(str(folder))
        (folder / "training_info.json").write_text(json.dumps({"dataset": "bench", "input_fields": []}))
        refs.append(AdapterRef(folder.name, folder))
    return refs


def never_stop_early(model: Any, tokenizer: Any) -> bool:
    """Zero the output rows of the special tokens: their logit is then 0 while the largest other one is positive.
    False if the output layer is not a plain float weight (then generations may end early; tokens are counted)."""
    weight = model.get_output_embeddings().weight
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    with torch.no_grad():
        weight[tokenizer.all_special_ids] = 0
    return True


def lora_in_float32(model: Any, tokenizer: Any) -> None:
    """The loaded adapters' LoRA weights back in float32, as peft loads them (the server casts them to the base's
    bf16, ``service.serving.adapters.adapter_in_base_dtype``). Before any pass: a captured graph replays the
    weights it was captured with."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.lora_A[name].float()
                module.lora_B[name].float()


def texts_for(count: int) -> list[str]:
    from service.llm.builtin.data import builtin_dataset

    pool = [e.input for e in builtin_dataset()[1]]
    return [pool[i % len(pool)] for i in range(count)]


# ------------------------------------------------------------------------------------------------ measuring
def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"p50_ms": round(statistics.median(ordered), 2), "p95_ms": round(p95, 2), "n": len(ordered)}


def label_latency(server: ModelServer, adapter: AdapterRef | None, texts: list[str], repeats: int) -> dict[str, Any]:
    """Batch 1, label only (star, label and reaction scored; no text generated)."""
    server.analyze([texts[0]], adapter, 0)  # warm-up (and loads the adapter)
    samples = []
    for i in range(repeats):
        sync()
        started = time.perf_counter()
        server.analyze([texts[i % len(texts)]], adapter, 0)
        sync()
        samples.append((time.perf_counter() - started) * 1000)
    return percentiles(samples)


def hf_generate(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, static: bool = False) -> int:
    """Plain transformers: left-padded batch, greedy ``model.generate`` (``static``: with its static KV cache, which
    it compiles); returns the tokens generated."""
    batch = left_padded(tokenizer, prompts, next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **({"cache_implementation": "static"} if static else {}),
        )
    return int((out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0])


def timed(
    server: ModelServer, adapter: AdapterRef | None, variants: list[tuple[str, Callable[[Any, Any], int]]], repeats: int
) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    """tokens/s of each variant (median of ``repeats`` rounds, alternating), tokens counted, first-round seconds."""
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    counts: dict[str, int] = {}
    warm_up: dict[str, float] = {}
    for i in range(repeats + 1):  # the first round warms up (and compiles or captures graphs)
        for name, fn in variants:
            sync()
            started = time.perf_counter()
            counts[name] = server.with_model(adapter, fn)
            sync()
            seconds = time.perf_counter() - started
            if i:
                times[name].append(seconds)
            else:
                warm_up[name] = round(seconds, 1)
    return {name: counts[name] / statistics.median(times[name]) for name in times}, counts, warm_up


def generation(
    server: ModelServer, adapter: AdapterRef | None, texts: list[str], batch: int, repeats: int
) -> dict[str, Any]:
    """tokens/s of FlashTune's ``scoring.generate`` and of plain ``model.generate``, alternating, same prompts."""
    chosen = texts[:batch]
    decoders: list[str] = []

    def flashtune(model: Any, tokenizer: Any) -> int:
        generate(model, tokenizer, build_prompts(model, tokenizer, chosen), NEW_TOKENS)
        decoder = decoder_for(model)
        decoders.append("generate" if decoder is None else "generate (graph failed)" if decoder.broken else "graph")
        return batch * NEW_TOKENS

    def plain(model: Any, tokenizer: Any) -> int:
        return hf_generate(model, tokenizer, build_prompts(model, tokenizer, chosen), NEW_TOKENS)

    rates, counts, warm_up = timed(server, adapter, [("flashtune", flashtune), ("hf", plain)], repeats)
    return {
        "batch": batch,
        "new_tokens": NEW_TOKENS,
        "decoding": decoders[-1],
        "flashtune_tokens_per_s": round(rates["flashtune"], 1),
        "hf_tokens_per_s": round(rates["hf"], 1),
        "hf_tokens_generated": counts["hf"],
        "ratio": round(rates["flashtune"] / rates["hf"], 3),
        "warm_up_s": warm_up,
    }


def graph_exactness(server: ModelServer, adapter: AdapterRef, texts: list[str]) -> dict[str, Any]:
    """The graph replays exactly the step it recorded: the same tokens as the same decoder run eagerly, for a
    left-padded batch of 4 (and how many rows ``generate`` matches, whose kernels differ: informational)."""

    def compare(model: Any, tokenizer: Any) -> dict[str, Any]:
        batch = left_padded(tokenizer, build_prompts(model, tokenizer, texts[:4]), "cuda")
        eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
        with torch.no_grad():
            graphed = GraphDecoder(model, eos, pad).generate(batch["input_ids"], batch["attention_mask"], NEW_TOKENS)
            eager = GraphDecoder(model, eos, pad, graphs=False).generate(
                batch["input_ids"], batch["attention_mask"], NEW_TOKENS
            )
            plain = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
        plain = plain[:, batch["input_ids"].shape[1] :]
        assert graphed is not None and eager is not None, "graph decoding fell back to generate"
        return {
            "graph_equals_eager": bool(torch.equal(graphed, eager)),
            "rows_equal_to_generate": int((graphed == plain).all(dim=1).sum()),
            "rows": 4,
        }

    return server.with_model(adapter, compare)


def adapter_switching(server: ModelServer, adapters: list[AdapterRef], texts: list[str]) -> dict[str, Any]:
    """The attached base's graph decoder across adapters: for each of adapter 1, adapter 2, the base alone and
    adapter 1 again, the graph-decoded tokens of a batch of 4 against the same step run eagerly. A graph that
    replayed another adapter's weights would differ."""
    rounds: list[dict[str, Any]] = []
    for adapter in [adapters[0], adapters[1], None, adapters[0]]:

        def compare(model: Any, tokenizer: Any) -> dict[str, Any]:
            batch = left_padded(tokenizer, build_prompts(model, tokenizer, texts[:4]), "cuda")
            decoder = decoder_for(model)
            assert decoder is not None, "the attached model has no graph decoder"
            with torch.no_grad():
                graphed = decoder.generate(batch["input_ids"], batch["attention_mask"], NEW_TOKENS)
                eager = GraphDecoder(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, graphs=False).generate(
                    batch["input_ids"], batch["attention_mask"], NEW_TOKENS
                )
            assert graphed is not None and eager is not None, "graph decoding fell back to generate"
            return {"graph_equals_eager": bool(torch.equal(graphed, eager)), "first_row": graphed[0, :8].tolist()}

        rounds.append({"adapter": adapter.name if adapter else None, **server.with_model(adapter, compare)})
    return {
        "rounds": rounds,
        "all_equal": all(r["graph_equals_eager"] for r in rounds),
        "distinct_outputs": len({str(r["first_row"]) for r in rounds}),
    }


def compiled_static(server: ModelServer, adapter: AdapterRef, texts: list[str], repeats: int) -> dict[str, Any]:
    """Batch 1: ``generate`` with transformers' compiled static cache (what FlashTune used before graph decoding)."""

    def compiled(model: Any, tokenizer: Any) -> int:
        return hf_generate(model, tokenizer, build_prompts(model, tokenizer, texts[:1]), NEW_TOKENS, static=True)

    rates, _, warm_up = timed(server, adapter, [("hf_compiled_static", compiled)], repeats)
    return {"hf_compiled_static_tokens_per_s": round(rates["hf_compiled_static"], 1), "warm_up_s": warm_up}


def throughput(
    server: ModelServer, adapters: list[AdapterRef], texts: list[str], requests: int, threads: int
) -> dict[str, Any]:
    """Label-only requests/s through the micro-batcher, requests cycling over ``adapters``."""
    jobs = [(texts[i % len(texts)], adapters[i % len(adapters)]) for i in range(requests)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda job: server.submit(job[0], job[1], 0), jobs[:threads]))  # warm-up
        sync()
        started = time.perf_counter()
        results = list(pool.map(lambda job: server.submit(job[0], job[1], 0), jobs))
        sync()
    seconds = time.perf_counter() - started
    return {
        "adapters_used": len(adapters),
        "adapters_loaded": len(server.loaded_adapters),
        "requests": requests,
        "requests_per_s": round(requests / seconds, 2),
        "mean_batch_size": round(statistics.mean(r.batch_size for r in results), 2),
    }


# --------------------------------------------------------------------------------------------------------- phases
Step = Callable[[str, Callable[[], Any]], Any]


def before_phase(
    settings: dict[str, Any], adapter: AdapterRef, texts: list[str], step: Step, sizes: dict[str, int]
) -> None:
    """The baseline of ``label_latency_adapter`` in this run: the NF4 base with the adapter attached as served before
    Liger's kernels, bf16 adapters and dense NF4 copies (the adapter's LoRA weights put back in float32 once it is
    loaded, before any pass). First: once any model is fused, Liger has patched transformers' Llama module for the
    whole process."""
    server = ModelServer(Settings(**settings, fused_kernels=False, serve_dense_nf4=False))
    try:
        server.with_model(None, never_stop_early)
        server.with_model(adapter, lora_in_float32)  # loads the adapter (cast to bf16), and puts it back
        step("label_latency_adapter_before", lambda: label_latency(server, adapter, texts, sizes["latency_repeats"]))
    finally:
        server.release()


def compiled_phase(
    settings: dict[str, Any], adapter: AdapterRef, texts: list[str], step: Step, sizes: dict[str, int]
) -> None:
    """The baseline of ``merged_generation_batch_1``: the merged copy decoding with transformers' compiled static
    cache, without graph decoding or Liger. Alone in its process (``--only merged_batch_1_compiled_static``): in a
    process that has captured decoding graphs, the compiled run ended in an illegal memory access on the H200."""
    server = ModelServer(
        Settings(**settings, fused_kernels=False, cuda_graph_decoding=False, serve_merged=adapter.name)
    )
    try:
        server.with_model(adapter, never_stop_early)
        step("merged_batch_1_compiled_static", lambda: compiled_static(server, adapter, texts, sizes["repeats"]))
    finally:
        server.release()


def bf16_base_phase(
    settings: dict[str, Any], adapter: AdapterRef, texts: list[str], step: Step, sizes: dict[str, int]
) -> None:
    """``FLASHTUNE_SERVE_QUANTIZATION=none``: adapters attached to an unquantised bf16 base, the middle way between
    the NF4 base (least memory) and a merged copy per adapter (fastest)."""
    server = ModelServer(Settings(**settings, serve_quantization="none"))
    try:
        server.with_model(None, never_stop_early)
        step("label_latency_adapter_bf16_base", lambda: label_latency(server, adapter, texts, sizes["latency_repeats"]))
    finally:
        server.release()


def dense_nf4_phase(
    settings: dict[str, Any], adapter: AdapterRef, texts: list[str], step: Step, sizes: dict[str, int]
) -> None:
    """Label-only latency of the adapter attached to the NF4 base with ``FLASHTUNE_SERVE_DENSE_NF4`` on (the
    default) and off, and to a bf16 base (``SERVE_QUANTIZATION=none``): all three servers loaded, requests
    alternating between them so that all see the same machine."""
    servers = {
        "dense": ModelServer(Settings(**settings)),
        "per_pass": ModelServer(Settings(**settings, serve_dense_nf4=False)),
        "bf16_base": ModelServer(Settings(**settings, serve_quantization="none")),
    }

    def paired() -> dict[str, Any]:
        result: dict[str, Any] = {}
        samples: dict[str, list[float]] = {name: [] for name in servers}
        for name, server in servers.items():
            before = gib() or 0.0
            server.with_model(None, never_stop_early)
            result[f"{name}_base_gib"] = round((gib() or 0.0) - before, 2)
            server.analyze([texts[0]], adapter, 0)  # warm-up: loads the adapter, captures the graph
        for i in range(sizes["latency_repeats"]):
            for name, server in servers.items():
                sync()
                started = time.perf_counter()
                server.analyze([texts[i % len(texts)]], adapter, 0)
                sync()
                samples[name].append((time.perf_counter() - started) * 1000)
        for name in servers:
            result[name] = percentiles(samples[name])
        result["p50_ratio_per_pass_over_dense"] = round(result["per_pass"]["p50_ms"] / result["dense"]["p50_ms"], 3)
        # Same numbers? Scoring passes are long enough that bitsandbytes dequantises and multiplies, as the copies do.
        answers = {
            name: [server.analyze([text], adapter, 0)[0].summary() for text in texts[:8]]
            for name, server in servers.items()
            if name != "bf16_base"
        }
        result["texts_compared"] = len(answers["dense"])
        result["dense_predictions_equal_per_pass"] = sum(
            all(a[k] == b[k] for k in ("label", "probs", "importance", "market_reaction"))
            for a, b in zip(answers["dense"], answers["per_pass"], strict=True)
        )
        result["max_prob_difference"] = max(
            abs(a["probs"][k] - b["probs"][k])
            for a, b in zip(answers["dense"], answers["per_pass"], strict=True)
            for k in a["probs"]
        )
        return result

    try:
        step("label_latency_dense_nf4_paired", paired)
    finally:
        for server in servers.values():
            server.release()


def attached_phase(
    server: ModelServer,
    adapters: list[AdapterRef],
    texts: list[str],
    step: Step,
    report: dict[str, Any],
    sizes: dict[str, int],
) -> None:
    """The NF4 (CPU: float32) base with adapters attached, as the API serves by default."""
    started = time.perf_counter()
    zeroed = server.with_model(None, never_stop_early)
    report["load_base"] = {
        "seconds": round(time.perf_counter() - started, 1),
        "allocated_gib": gib(),
        "quantization": "nf4" if torch.cuda.is_available() else "none (float32, CPU)",
        "special_tokens_zeroed": zeroed,
    }
    first, repeats, requests = adapters[0], sizes["repeats"], sizes["requests"]
    step("label_latency_base_alone", lambda: label_latency(server, None, texts, sizes["latency_repeats"]))
    step("label_latency_adapter", lambda: label_latency(server, first, texts, sizes["latency_repeats"]))
    step("generation_batch_1", lambda: generation(server, first, texts, 1, repeats))
    step("generation_batch_32", lambda: generation(server, first, texts, 32, repeats))
    step("attached_graph_exactness", lambda: graph_exactness(server, first, texts))
    if len(adapters) > 1:
        step("attached_adapter_switching", lambda: adapter_switching(server, adapters, texts))
    step("throughput_1_loaded", lambda: throughput(server, [first], texts, requests, 64))

    def load_all() -> dict[str, Any]:
        began = time.perf_counter()
        for ref in adapters:
            server.analyze([texts[0]], ref, 0)
        per_adapter = (time.perf_counter() - began) / len(adapters)
        return {
            "adapters": len(adapters),
            "seconds_per_adapter_first_request": round(per_adapter, 3),
            "allocated_gib": gib(),
        }

    step("load_all_adapters", load_all)
    step("throughput_all_loaded_one_used", lambda: throughput(server, [first], texts, requests, 64))
    step("throughput_all_loaded_mixed", lambda: throughput(server, adapters, texts, requests, 64))
    if sizes.get("mixed_paths"):
        mixed_paths(server, adapters, texts, step, report, requests)
    server.release()  # its micro-batcher thread keeps the server alive: drop the models explicitly


def with_gathered(server: ModelServer, on: bool, fn: Callable[[], Any]) -> Any:
    """``fn()`` with mixed batches gathered (``on``) or through peft's loop (``FLASHTUNE_GATHERED_LORA``)."""
    server.settings.gathered_lora = on
    try:
        return fn()
    finally:
        server.settings.gathered_lora = True


def gathered_exactness(server: ModelServer, adapters: list[AdapterRef], texts: list[str]) -> dict[str, Any]:
    """One mixed batch (one text per adapter, and the base) through both paths: labels and probabilities."""
    rows: list[AdapterRef | None] = [*adapters, None]
    items = [Item(texts[i % len(texts)], adapter) for i, adapter in enumerate(rows)]
    answers = {
        path: [a.summary() for a in with_gathered(server, on, lambda: server.analyze_items(items, 0))]
        for path, on in (("gathered", True), ("peft", False))
    }
    # bf16's own noise floor: the same rows through peft one at a time (a batch of one adapter each), against the
    # mixed batch through peft; only batch composition and summation order differ there
    answers["peft_alone"] = [server.analyze_items([item], 0)[0].summary() for item in items]

    def compared(a: str, b: str) -> dict[str, Any]:
        pairs = list(zip(answers[a], answers[b], strict=True))
        return {
            "labels_equal": sum(x["label"] == y["label"] for x, y in pairs),
            "max_prob_difference": round(
                max(abs(x["probs"][k] - y["probs"][k]) for x, y in pairs for k in x["probs"]), 4
            ),
            "mean_prob_difference": round(
                statistics.fmean(abs(x["probs"][k] - y["probs"][k]) for x, y in pairs for k in x["probs"]), 4
            ),
        }

    return {
        "rows": len(items),
        **compared("gathered", "peft"),
        "peft_alone_vs_peft_mixed": compared("peft_alone", "peft"),
        "gathered_vs_peft_alone": compared("gathered", "peft_alone"),
    }


def mixed_paths(
    server: ModelServer, adapters: list[AdapterRef], texts: list[str], step: Step, report: dict[str, Any], n: int
) -> None:
    """``--mixed-paths``: the mixed requests again through peft's loop, both paths' answers compared, and the ratios
    against one adapter loaded and all loaded with one used, all from this run."""
    step("gathered_exactness", lambda: gathered_exactness(server, adapters, texts))
    mixed = lambda: throughput(server, adapters, texts, n, 64)  # noqa: E731 - as throughput_all_loaded_mixed
    step("throughput_all_loaded_mixed_peft", lambda: with_gathered(server, False, mixed))

    def ratios() -> dict[str, Any]:
        rate = {k: report[k]["requests_per_s"] for k in THROUGHPUTS if "requests_per_s" in report.get(k, {})}
        return {
            f"{a}_over_{b}": round(rate[a] / rate[b], 3)
            for a, b in (
                ("throughput_all_loaded_mixed", "throughput_1_loaded"),
                ("throughput_all_loaded_mixed_peft", "throughput_1_loaded"),
                ("throughput_all_loaded_mixed", "throughput_all_loaded_one_used"),
                ("throughput_all_loaded_mixed", "throughput_all_loaded_mixed_peft"),
            )
            if a in rate and b in rate
        }

    step("mixed_ratios", ratios)


def merged_phase(server: ModelServer, adapter: AdapterRef, texts: list[str], step: Step, sizes: dict[str, int]) -> None:
    """The same adapter merged into an unquantised (bf16; CPU: float32) copy of the base."""

    def load_merged() -> dict[str, Any]:
        began = time.perf_counter()
        zeroed = server.with_model(adapter, never_stop_early)
        return {
            "seconds": round(time.perf_counter() - began, 1),
            "allocated_gib": gib(),
            "dtype": "bfloat16" if torch.cuda.is_available() else "float32",
            "special_tokens_zeroed": zeroed,
        }

    step("load_merged", load_merged)
    step("merged_label_latency", lambda: label_latency(server, adapter, texts, sizes["latency_repeats"]))
    step("merged_graph_exactness", lambda: graph_exactness(server, adapter, texts))
    step("merged_generation_batch_1", lambda: generation(server, adapter, texts, 1, sizes["repeats"]))
    step("merged_generation_batch_32", lambda: generation(server, adapter, texts, 32, sizes["repeats"]))
    step("merged_throughput", lambda: throughput(server, [adapter], texts, sizes["requests"], 64))


# --------------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="where the random checkpoint is (built there if missing)")
    parser.add_argument("--data-dir", help="DATA_DIR for the adapters (default: a temporary folder)")
    parser.add_argument("--adapters", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: checks the script")
    parser.add_argument("--out", default=".")
    parser.add_argument("--only", default="", help="comma-separated measurement keys to run (default: all)")
    parser.add_argument("--batch-wait-ms", type=float, help="the micro-batcher's wait (default: the service's, 0)")
    parser.add_argument(
        "--mixed-paths",
        action="store_true",
        help="also mixed requests through peft's loop (gathered_lora off), both paths compared, ratios of this run",
    )
    return parser.parse_args()


class Report:
    """The JSON summary, saved after every measurement; ``only``: the measurement keys to run (empty: all)."""

    def __init__(self, out: Path, only: set[str], figures: dict[str, Any]) -> None:
        self.out, self.only, self.figures = out, only, figures

    def save(self) -> None:
        (self.out / "analyze_gpu.json").write_text(json.dumps(self.figures, indent=2))

    def step(self, key: str, fn: Callable[[], Any]) -> Any:
        """Run one measurement; a failure is reported and the others still run."""
        if self.only and key not in self.only:
            return None
        try:
            self.figures[key] = fn()
            log(key, json.dumps(self.figures[key]))
        except Exception:  # noqa: BLE001 - reported in the summary
            log(f"{key} FAILED\n{traceback.format_exc()}")
            self.figures[key] = {"error": traceback.format_exc()[-2000:]}
            cleanup()
        self.save()
        return self.figures[key]


def run_phases(
    settings: dict[str, Any], adapters: list[AdapterRef], texts: list[str], report: Report, sizes: dict[str, int]
) -> None:
    """Every phase that ``--only`` asks for, each server released before the next one loads."""
    only, step = report.only, report.step
    if only == {"merged_batch_1_compiled_static"}:
        compiled_phase(settings, adapters[0], texts, step, sizes)
        return
    if not only or "label_latency_adapter_before" in only:
        before_phase(settings, adapters[0], texts, step, sizes)
        cleanup()
    if not only or "label_latency_dense_nf4_paired" in only:
        dense_nf4_phase(settings, adapters[0], texts, step, sizes)
        cleanup()
    if not only or "label_latency_adapter_bf16_base" in only:
        bf16_base_phase(settings, adapters[0], texts, step, sizes)
        cleanup()
    attached_phase(ModelServer(Settings(**settings)), adapters, texts, step, report.figures, sizes)
    cleanup()
    merged_phase(ModelServer(Settings(**settings, serve_merged=adapters[0].name)), adapters[0], texts, step, sizes)
    if settings["device"] == "cuda":
        report.figures["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def main() -> None:
    args = parse_args()
    tiny = args.tiny or not torch.cuda.is_available()
    device = "cpu" if tiny else "cuda"
    checkpoint = Path(args.checkpoint or f"/tmp/flashtune-bench/{'tiny-llama' if tiny else 'deepseek-7b-shaped'}")
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="flashtune-analyze-gpu-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = (
        {"repeats": 1, "latency_repeats": 5, "requests": 48}
        if tiny
        else {"repeats": 3, "latency_repeats": 30, "requests": 256}
    )
    sizes["mixed_paths"] = int(args.mixed_paths)
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny 2-layer Llama" if tiny else "random DeepSeek-LLM-7B-shaped Llama (bf16 checkpoint)",
        "adapters": args.adapters,
    }
    report = Report(out, set(filter(None, args.only.split(","))), figures)
    started = time.perf_counter()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    build(checkpoint, tiny)
    figures["build_checkpoint_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    adapters = make_adapters(checkpoint, data_dir / "adapters", max(args.adapters, 1))
    figures["make_adapters_s"] = round(time.perf_counter() - started, 1)
    log("checkpoint", checkpoint, "and", len(adapters), "adapters ready")
    settings: dict[str, Any] = dict(
        data_dir=data_dir,
        base_model=str(checkpoint),
        device=device,
        batch_max_size=64,
        max_loaded_adapters=len(adapters) + 1,
    )
    if args.batch_wait_ms is not None:
        settings["batch_wait_ms"] = args.batch_wait_ms
    figures["batch_wait_ms"] = Settings(**settings).batch_wait_ms
    run_phases(settings, adapters, texts_for(64), report, sizes)
    report.save()
    if report.only != {"merged_batch_1_compiled_static"}:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
