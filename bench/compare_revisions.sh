#!/usr/bin/env bash
# The GPU benchmarks of an earlier revision against the working tree, on one machine in one call (ratios, not
# figures from different days). Prepare here, in the repository root:
#     git archive <revision> | (rm -rf .baseline && mkdir .baseline && tar -x -C .baseline)
#     echo /.baseline/ >> .git/info/exclude
#     ../shared/device/prepare-site.sh liger-kernel==0.8.5 pydantic==2.14.4 pydantic_core==2.50.5 \
#       annotated-types==0.8.0 typing-inspection==0.4.5 sqlmodel==0.0.50 SQLAlchemy==2.1.9 \
#       pydantic-settings==2.16.3 python-dotenv typing_extensions==4.16.0 greenlet
#     mkdir -p .devsite/seed && cp ../shared/data/seed/instructions.jsonl .devsite/seed/
# then on the GPU machine (carry .devsite and .baseline): bash bench/compare_revisions.sh train|analyze|throughput
#   train       bench/train_gpu.py: hf and worker on the working tree, worker on the baseline, worker again
#   analyze     bench/analyze_gpu.py: label latency, generation at batch 1 and 32, throughput; baseline first
#   throughput  label latency and micro-batched throughput, baseline and working tree alternating, twice each
# Results land in $OUT/<old|new><n>/. docs/benchmarks.md ("Session 10") has the figures of the restructure.
set -uo pipefail
ROOT=$PWD
CK=${CK:-/tmp/ck/deepseek-7b-shaped}
DS=$ROOT/.devsite/seed/instructions.jsonl
OUT=${OUT:-$ROOT/compare-out}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
new() { (cd "$ROOT" && PYTHONPATH=$ROOT/.devsite:$ROOT "$@"); }
old() { (cd "$ROOT/.baseline" && PYTHONPATH=$ROOT/.devsite:$ROOT/.baseline "$@"); }
train() { python3 bench/train_gpu.py --checkpoint "$CK" --dataset "$DS" "$@"; }
analyze() { python3 bench/analyze_gpu.py --checkpoint "$CK" --adapters 2 "$@"; }
case "${1:-}" in
  train)
    new train --only hf,worker --out "$OUT/new1" 2>&1 | tail -5
    old train --only worker --out "$OUT/old1" 2>&1 | tail -5
    new train --only worker --out "$OUT/new2" 2>&1 | tail -5
    ;;
  analyze)
    M=label_latency_adapter,generation_batch_1,generation_batch_32,throughput_1_loaded
    old analyze --only $M --out "$OUT/old1" 2>&1 | tail -3
    new analyze --only $M --out "$OUT/new1" 2>&1 | tail -3
    ;;
  throughput)
    for run in 1 2; do
      for side in old new; do
        $side analyze --only label_latency_adapter,throughput_1_loaded --out "$OUT/$side$((run + 1))" 2>&1 | tail -3
      done
    done
    ;;
  *) echo "usage: bash bench/compare_revisions.sh train|analyze|throughput" >&2; exit 2 ;;
esac
