"""Where a job's base-model load goes, on the GPU machine: the 7B shape quantised to NF4 on load (the worker's path,
``service.llm.modeling.load_model``) against reading the same files alone, loading them in bf16, and loading a copy that
was saved already quantised. Each load runs in a fresh process, so nothing is cached in the process between them.

    export PYTHONPATH=$PWD/.devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python3 bench/load_gpu.py --checkpoint /tmp/ck/deepseek-7b-shaped --out $OUT

Variants (``--only``): ``imports`` (torch, transformers, peft, bitsandbytes: what a spawned job child imports),
``read`` (every safetensors tensor into CPU memory), ``bf16`` (``from_pretrained`` to the GPU in bf16), ``nf4``
(the worker's load), ``nf4_profile`` (the same under cProfile, top 25 by cumulative time), ``save_nf4`` (save the
NF4 model, as loaded, to DIR-nf4), ``prequantized`` (load that saved copy), ``equal`` (its weights equal the
on-the-fly NF4 weights, bit for bit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
VARIANTS = ["imports", "read", "bf16", "nf4", "nf4_profile", "save_nf4", "prequantized", "equal"]


def _nf4(source: str) -> Any:
    from service.llm.modeling import load_model, plan_load

    return load_model(source, plan_load("cuda", "auto"))


def _profiled_nf4(source: str) -> str:
    """The worker's load under cProfile: the top 25 by cumulative time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    _nf4(source)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
    return text.getvalue()[-6000:]


def run_variant(name: str, checkpoint: Path) -> dict[str, Any]:
    started = time.perf_counter()
    if name == "imports":
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        return {"seconds": round(time.perf_counter() - started, 2)}
    import torch

    torch.cuda.init()
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if name == "read":
        from safetensors import safe_open

        total = 0
        for path in sorted(checkpoint.glob("*.safetensors")):
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    total += handle.get_tensor(key).numel() * 2
        result["gib"] = round(total / 2**30, 2)
    elif name == "bf16":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.bfloat16, device_map={"": 0})
    elif name == "nf4":
        _nf4(str(checkpoint))
    elif name == "nf4_profile":
        result["profile"] = _profiled_nf4(str(checkpoint))
    elif name == "save_nf4":
        model = _nf4(str(checkpoint))
        loaded = time.perf_counter()
        model.save_pretrained(str(checkpoint) + "-nf4")
        result["save_seconds"] = round(time.perf_counter() - loaded, 2)
    elif name == "prequantized":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(str(checkpoint) + "-nf4", device_map={"": 0})
    elif name == "equal":
        from transformers import AutoModelForCausalLM

        fly = _nf4(str(checkpoint)).state_dict()
        saved = AutoModelForCausalLM.from_pretrained(str(checkpoint) + "-nf4", device_map={"": 0}).state_dict()
        result["same_keys"] = sorted(fly) == sorted(saved)
        result["unequal"] = [k for k in fly if k in saved and not torch.equal(fly[k].cpu(), saved[k].cpu())][:10]
    torch.cuda.synchronize()
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    if args.variant:
        print(json.dumps(run_variant(args.variant, checkpoint)))
        return
    if not (checkpoint / "config.json").exists():
        from bench.job_api_gpu import build

        build(checkpoint, tiny=False)
    report: dict[str, Any] = {}
    for name in args.only.split(","):
        done = subprocess.run(
            [sys.executable, __file__, "--checkpoint", str(checkpoint), "--variant", name],
            capture_output=True,
            text=True,
        )
        last = done.stdout.strip().splitlines()[-1:] or [""]
        try:
            report[name] = json.loads(last[0])
        except json.JSONDecodeError:
            report[name] = {"error": done.stderr[-2000:]}
        print(name, json.dumps(report[name])[:300], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "load_gpu.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
