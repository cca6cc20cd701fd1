"""GPU benchmark of the fused NF4 decoding kernel (``service/llm/nf4_kernels.py``, ``FLASHTUNE_NF4_DECODE_KERNEL``).

(a) ``microbench``: NF4 layers of the 7B shape's MLP, 4096 -> 11008 (gate/up) and 11008 -> 4096 (down), quantised by
    bitsandbytes as FlashTune loads them (NF4, double quantisation, bf16 compute), at M = 1, 8 and 32 rows. For
    each: the kernel (the configuration ``pick_config`` picks, and a small sweep of others), bitsandbytes' own path
    (``Linear4bit.forward`` -> ``bnb.matmul_4bit``) and a bf16 dense matmul with the dequantised weight; the kernel's
    and bitsandbytes' largest absolute and relative difference from that dense product; GB/s of what each reads.
    Timed by replaying a CUDA graph of calls (no launch overhead, as in the graph decoder) over enough copies of
    the layer to keep them out of the L2 cache.
(b) ``end_to_end``: ``service.llm.scoring.generate`` tokens/s at batch 1 and 32, 64 new tokens, through a
    ``ModelServer`` that serves the NF4 7B-shaped base with one attached q/v r 8 adapter (``bench/analyze_gpu``'s
    helpers), loaded with ``nf4_decode_kernel=auto``; the kernel is then detached from the same loaded model
    (``detach_decode_kernel``: the setting's ``off``) for the baseline, alternating rounds. Whether the greedy
    tokens of both agree, row by row.

    export PYTHONPATH=$PWD/.devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python3 bench/nf4_decode_gpu.py --checkpoint /tmp/ft-fp16/models/deepseek-7b-shaped --out $OUT

``--tiny``: a 2-layer model on the CPU, the microbench skipped (no CUDA); checks the script. One JSON,
``nf4_decode_gpu.json``, in ``--out``, saved after each part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.analyze_gpu import cleanup, make_adapters, never_stop_early, sync, texts_for  # noqa: E402
from bench.job_api_gpu import build  # noqa: E402
from service.core.config import Settings  # noqa: E402
from service.core.layout import AdapterRef  # noqa: E402
from service.llm.decoding import attach, decoder_for  # noqa: E402
from service.llm.nf4 import nf4_layers  # noqa: E402
from service.llm.nf4_kernels import (  # noqa: E402
    DecodeForward,
    KernelConfig,
    Nf4Weight,
    detach_decode_kernel,
    nf4_linear,
    pick_config,
    triton_available,
)
from service.llm.scoring import build_prompts, generate, left_padded  # noqa: E402
from service.serving.engine import ModelServer  # noqa: E402

NEW_TOKENS = 64
SHAPES = ((11008, 4096), (4096, 11008))  # (out, in): gate/up, down
ROWS = (1, 8, 32)
# other configurations: (block_m, block_n, block_kb, num_warps, num_stages[, split_k, select_code])
SWEEP: dict[int, list[tuple[Any, ...]]] = {
    1: [
        (1, 16, 128, 4, 4),
        (1, 32, 128, 4, 3),
        (1, 16, 256, 4, 4),
        (1, 8, 256, 2, 4),
        (1, 16, 128, 4, 3, 2),
        (1, 16, 128, 4, 3, 1, True),
    ],
    8: [
        (8, 16, 64, 4, 3),
        (8, 16, 128, 8, 3),
        (16, 32, 64, 4, 3),
        (16, 64, 64, 4, 3, 2),
        (8, 32, 64, 8, 3, 1, True),
    ],
    32: [
        (32, 32, 64, 4, 3),
        (32, 128, 64, 8, 3),
        (32, 128, 64, 8, 3, 4),
        (32, 32, 64, 4, 3, 2),
        (32, 64, 64, 4, 3, 2, True),
    ],
}
L2_BYTES = 256 * 2**20  # the layer copies of one timing take more memory than this (H100: 50 MiB of L2)


def log(*args: Any) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


# ------------------------------------------------------------------------------------------------ (a)
def nf4_layer(n_out: int, n_in: int, seed: int) -> Any:
    """A bitsandbytes 4-bit layer as FlashTune loads the base (NF4, double quantisation, bf16 compute), quantised
    on the GPU from a random bf16 weight."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    gen = torch.Generator(device="cuda").manual_seed(seed)
    weight = torch.randn(n_out, n_in, device="cuda", generator=gen, dtype=torch.bfloat16) * n_in**-0.5
    layer = Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.cuda().eval()


def per_call_us(calls: list[Callable[[], Any]], rounds: int = 5) -> tuple[float, str]:
    """Microseconds per call, from replaying a CUDA graph of ``calls`` (median of ``rounds`` replays); eagerly
    timed if capturing fails."""
    for call in calls:  # compile / warm up
        call()
    sync()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        run, how = graph.replay, "cuda graph"
    except Exception:  # noqa: BLE001 - reported as eager timing
        log("capture failed, timing eagerly:", traceback.format_exc(limit=2))

        def run() -> None:
            for call in calls:
                call()

        how = "eager"
    run()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times), how


def differences(out: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = (out.float() - reference.float()).abs()
    return {
        "max_abs": float(diff.max()),
        "max_rel_to_max": float(diff.max() / reference.float().abs().max()),
        "mean_abs": float(diff.mean()),
    }


def kernel_calls(x: torch.Tensor, weights: list[Nf4Weight], config: KernelConfig | None) -> list[Callable[[], Any]]:
    def call(w: Nf4Weight) -> Callable[[], Any]:
        return lambda: nf4_linear(x, w.packed, w.absmax, w.code, w.shape, None, w.blocksize, config)

    return [call(w) for w in weights]


def rows_bench(
    x: torch.Tensor, layers: list[Any], weights: list[Nf4Weight], dense: list[torch.Tensor]
) -> dict[str, Any]:
    """One shape at one row count: the kernel (picked configuration and a sweep), bitsandbytes, bf16 dense."""
    rows, (n_out, n_in), w0 = x.shape[0], weights[0].shape, weights[0]
    reference = torch.nn.functional.linear(x, dense[0])
    packed_bytes = n_out * n_in // 2
    entry: dict[str, Any] = {"copies_cycled": len(weights)}
    kernel_read = packed_bytes + n_out * n_in // 64 * 4 + x.numel() * 2 + rows * n_out * 2
    us, how = per_call_us(kernel_calls(x, weights, None))
    out = nf4_linear(x, w0.packed, w0.absmax, w0.code, w0.shape, None, w0.blocksize)
    entry["kernel"] = {
        "config": pick_config(rows, n_out, n_in).__dict__,
        "us": round(us, 2),
        "gb_per_s": round(kernel_read / us / 1e3, 1),
        "timing": how,
        "vs_dequantise_then_matmul": differences(out, reference),
    }
    sweep = []
    for c in SWEEP[rows]:
        config = KernelConfig(*c)
        try:
            us_c, _ = per_call_us(kernel_calls(x, weights, config))
            out_c = nf4_linear(x, w0.packed, w0.absmax, w0.code, w0.shape, None, w0.blocksize, config)
            rel = differences(out_c, reference)["max_rel_to_max"]
            sweep.append({"config": config.__dict__, "us": round(us_c, 2), "max_rel": rel})
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is reported
            sweep.append({"config": config.__dict__, "error": repr(exc)[:300]})
    entry["kernel_sweep"] = sweep
    with torch.no_grad():
        us_b, how_b = per_call_us([partial(layer, x) for layer in layers])
        out_b = layers[0](x)
    nested_bytes = n_out * n_in // 64 + n_out * n_in // 64 // 256 * 4
    entry["bitsandbytes"] = {
        "us": round(us_b, 2),
        "gb_per_s": round((packed_bytes + nested_bytes) / us_b / 1e3, 1),
        "timing": how_b,
        "vs_dequantise_then_matmul": differences(out_b, reference),
    }
    us_d, how_d = per_call_us([partial(torch.nn.functional.linear, x, d) for d in dense])
    entry["bf16_dense"] = {"us": round(us_d, 2), "gb_per_s": round(2 * n_out * n_in / us_d / 1e3, 1), "timing": how_d}
    entry["kernel_speedup_vs_bitsandbytes"] = round(us_b / us, 2)
    entry["kernel_speedup_vs_bf16_dense"] = round(us_d / us, 2)
    return entry


def microbench() -> dict[str, Any]:
    from service.llm.nf4 import dequantize

    results: dict[str, Any] = {}
    for n_out, n_in in SHAPES:
        copies = max(2, -(-L2_BYTES // (n_out * n_in // 2)))
        layers = [nf4_layer(n_out, n_in, seed) for seed in range(copies)]
        weights = [w for w in (Nf4Weight.of(layer) for layer in layers) if w is not None]
        assert len(weights) == copies
        dense_copies = max(2, -(-L2_BYTES // (2 * n_out * n_in)))
        dense = [dequantize(layer.weight, torch.bfloat16) for layer in layers[:dense_copies]]
        for rows in ROWS:
            x = torch.randn(rows, n_in, device="cuda", dtype=torch.bfloat16)
            entry = rows_bench(x, layers, weights, dense)
            results[f"{n_out}x{n_in}_m{rows}"] = entry
            log(f"{n_out}x{n_in} M={rows}", json.dumps({k: v for k, v in entry.items() if k != "kernel_sweep"}))
        del layers, weights, dense
        cleanup()
    return results


# ------------------------------------------------------------------------------------------------ (b)
def set_kernel(model: Any, on: bool, saved: dict[int, DecodeForward]) -> int:
    """Attach or detach the kernel on the loaded model (``saved``: the wrappers the server made, kept to put them
    back); drops the graph decoder, whose graphs replay the forward they were captured with."""
    layers = nf4_layers(model)
    if on:
        for layer in layers:
            if id(layer) in saved:
                layer.forward = saved[id(layer)]
        changed = sum(isinstance(layer.forward, DecodeForward) for layer in layers)
    else:
        saved.update({id(layer): layer.forward for layer in layers if isinstance(layer.forward, DecodeForward)})
        changed = detach_decode_kernel(layers)
    attach(model, None)
    return changed


def end_to_end(settings: dict[str, Any], adapter: AdapterRef, repeats: int, new_tokens: int) -> dict[str, Any]:
    server = ModelServer(Settings(**settings, nf4_decode_kernel="auto"))
    texts = texts_for(64)
    result: dict[str, Any] = {}
    started = time.perf_counter()
    server.with_model(None, never_stop_early)
    result["load_base_s"] = round(time.perf_counter() - started, 1)
    saved: dict[int, DecodeForward] = {}
    result["layers_with_kernel"] = server.with_model(
        adapter, lambda m, t: sum(isinstance(layer.forward, DecodeForward) for layer in nf4_layers(m))
    )
    result["allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    for batch in (1, 32):
        chosen = texts[:batch]
        entry: dict[str, Any] = {"batch": batch, "new_tokens": new_tokens}
        tokens: dict[str, torch.Tensor | None] = {}
        for variant in ("off", "auto", "off_again"):  # off again: the baseline's drift over the run
            on = variant == "auto"
            # its own call: the next one makes a fresh graph decoder (``ModelServer.with_model``)
            server.with_model(adapter, lambda m, t: set_kernel(m, on, saved))  # noqa: B023 - called right here

            def run(model: Any, tokenizer: Any, chosen: list[str] = chosen) -> tuple[float, str]:
                prompts = build_prompts(model, tokenizer, chosen)
                sync()
                began = time.perf_counter()
                generate(model, tokenizer, prompts, new_tokens)
                sync()
                decoder = decoder_for(model)
                return time.perf_counter() - began, "graph" if decoder and not decoder.broken else "generate"

            def greedy(model: Any, tokenizer: Any, chosen: list[str] = chosen) -> torch.Tensor | None:
                decoder = decoder_for(model)
                batch_t = left_padded(tokenizer, build_prompts(model, tokenizer, chosen), model.device)
                with torch.no_grad():
                    return (
                        None
                        if decoder is None
                        else decoder.generate(batch_t["input_ids"], batch_t["attention_mask"], new_tokens)
                    )

            warm_up, _ = server.with_model(adapter, run)  # the cache and the capture
            tokens[variant] = server.with_model(adapter, greedy)
            timed = [server.with_model(adapter, run) for _ in range(repeats)]
            entry[f"{variant}_tokens_per_s"] = round(batch * new_tokens / statistics.median(t for t, _ in timed), 1)
            entry[f"{variant}_decoding"] = timed[-1][1]
            entry[f"{variant}_warm_up_s"] = round(warm_up, 2)
        entry["ratio_auto_to_off"] = round(entry["auto_tokens_per_s"] / entry["off_tokens_per_s"], 3)
        for other in ("auto", "off_again"):
            a, b = tokens.get("off"), tokens.get(other)
            if a is not None and b is not None and a.shape == b.shape:
                same = (a == b).all(dim=1)
                diverge = [int((a[r] != b[r]).nonzero()[0]) for r in range(a.shape[0]) if not bool(same[r])]
                entry[f"greedy_tokens_off_vs_{other}"] = {
                    "rows_equal": int(same.sum()),
                    "rows": int(a.shape[0]),
                    "first_divergence_positions": diverge[:32],
                }
        result[f"batch_{batch}"] = entry
        log(f"end_to_end batch {batch}", json.dumps(entry))
    server.with_model(adapter, lambda m, t: set_kernel(m, True, saved))
    result["layers_where_the_kernel_failed"] = server.with_model(  # each then ran its previous forward
        adapter, lambda m, t: sum(getattr(layer.forward, "failed", False) for layer in nf4_layers(m))
    )
    server.release()
    return result


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="where the random checkpoint is (built there if missing)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: checks the script")
    parser.add_argument("--only", default="", help="microbench or end_to_end (default: both)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    tiny = args.tiny or not torch.cuda.is_available()
    device = "cpu" if tiny else "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_available(),
        "model": "tiny 2-layer Llama" if tiny else "random DeepSeek-LLM-7B-shaped Llama (bf16 checkpoint)",
    }
    try:
        import bitsandbytes

        figures["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    parts = set(filter(None, args.only.split(","))) or {"microbench", "end_to_end"}

    def save() -> None:
        (out / "nf4_decode_gpu.json").write_text(json.dumps(figures, indent=2))

    def part(key: str, fn: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            figures[key] = fn()
        except Exception:  # noqa: BLE001 - reported in the JSON; the other part still runs
            log(f"{key} FAILED\n{traceback.format_exc()}")
            figures[key] = {"error": traceback.format_exc()[-3000:]}
        figures[f"{key}_s"] = round(time.perf_counter() - started, 1)
        save()
        cleanup()

    if "microbench" in parts:
        if device == "cuda" and figures["triton"]:
            part("microbench", microbench)
        else:
            figures["microbench"] = "skipped: needs CUDA and Triton"
    if "end_to_end" in parts:
        started = time.perf_counter()
        checkpoint = Path(args.checkpoint or f"/tmp/flashtune-bench/{'tiny-llama' if tiny else 'deepseek-7b-shaped'}")
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        build(checkpoint, tiny)
        data_dir = Path(tempfile.mkdtemp(prefix="flashtune-nf4-decode-"))
        adapter = make_adapters(checkpoint, data_dir / "adapters", 1)[0]
        figures["build_and_adapter_s"] = round(time.perf_counter() - started, 1)
        settings = {"data_dir": data_dir, "base_model": str(checkpoint), "device": device}
        part(
            "end_to_end", lambda: end_to_end(settings, adapter, 2 if tiny else args.repeats, 8 if tiny else NEW_TOKENS)
        )
    save()
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
