#!/usr/bin/env bash
# The user's seed job through the API three ways on one GPU (docs/benchmarks.md, session 11):
#   bf16     the card's own plan (bf16, varlen, Liger, graphs)
#   t4       the plan a T4 gets (FLASHTUNE_COMPUTE_DTYPE=float16, FLASHTUNE_CUDA_CAPABILITY=7.5: fp16 with dynamic loss
#            scaling, sdpa with the packed mask instead of flash varlen), FLASHTUNE_GPU_MEMORY_GIB=15, then the
#            adapter served over HTTP by an fp16 API (NF4 base + adapter, FLASHTUNE_SERVE_GPU_MEMORY_GIB=12)
#   nocc     the card's plan with no C compiler (CC=/bin/false, empty Triton cache): Liger cannot build its
#            kernels, the job must succeed on torch's layers and its events must say so
# On the GPU machine, with the seed file in .devsite/seed/ and bitsandbytes + liger-kernel in .devsite/:
#   export PYTHONPATH=$PWD/.devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
#   bash bench/fp16_plan_gpu.sh "$OUT" [bf16,t4,nocc]
set -uo pipefail
out=${1:-.}
only=${2:-bf16,t4,nocc}
seed=${SEED_FILE:-.devsite/seed/instructions.jsonl}
ck=/tmp/ft-fp16/models/deepseek-7b-shaped
mkdir -p "$out" /tmp/ft-fp16/models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$out/gpu.txt"
job() {  # name, then job_api_gpu.py arguments
  local name=$1
  shift
  case ",$only," in *",$name,"*) ;; *) return 0 ;; esac
  echo "=== $name $(date -u +%H:%M:%S)"
  python3 bench/job_api_gpu.py --data-dir "/tmp/ft-fp16/$name" --checkpoint "$ck" --dataset "$seed" \
    --out "$out" --name "job_$name.json" "$@" >"$out/job_$name.log" 2>&1
  echo "rc=$? $(date -u +%H:%M:%S)"
  python3 - "$out/job_$name.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("status", "post_to_done_s", "compute_dtype", "skipped_steps", "loss_scale", "peak_gpu_memory_gib", "losses",
        "adapter_tensors", "metrics", "durations", "error")
print(json.dumps({k: r.get(k) for k in keys}, ensure_ascii=False))
print("tokens/s", (r.get("progress") or {}).get("tokens_per_second"))
for t, kind, message in r.get("events", []):
    if kind in ("setup", "cuda_plan", "fallback", "skipped_step"):
        print(t, kind, message[:700])
print(json.dumps(r.get("serving"), ensure_ascii=False))
EOF
}
python3 -c "
import sys; sys.path.insert(0, '.')
from pathlib import Path
from bench.job_api_gpu import build
build(Path('$ck'), False)"
job t4 --compute-dtype float16 --cuda-capability 7.5 --gpu-memory-gib 15 --serve --serve-merged "" \
  --serve-gpu-memory-gib 12
job bf16
job nocc --hide-compiler
