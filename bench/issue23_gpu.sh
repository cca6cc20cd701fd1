#!/usr/bin/env bash
# Issue 23's open GPU measurements in one device call (~9 minutes on an H100), run from a clean copy of the tree:
#     git archive HEAD | (rm -rf .clean && mkdir .clean && tar -x -C .clean)   # here; carry .devsite and .clean
#     cp -r .devsite/seed .clean/.devsite-seed; cd .clean; bash bench/issue23_gpu.sh [train_s] [gen_s] [http_s]
# 1. bench/train_gpu.py: the capped plan against TRL, the seeds' spread of held-out loss ($TRAIN: the variants,
#    each in a process of its own, under $OUT/train/<variant>)
# 2. bench/analyze_gpu.py: decoding at batch 1 and 32
# 3. bench/http_latency.py: label-only /analyze over HTTP, every batch size graphed ($HTTP_ARGS: e.g. --baseline)
# Each part has its own time limit (seconds; 0 skips it) and writes under $OUT/train, $OUT/gen, $OUT/http.
set -u
R=$(cd .. && pwd)
export PYTHONPATH=$R/.devsite:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
CK=/tmp/ft-fp16/models/deepseek-7b-shaped
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
mkdir -p "$OUT/train" "$OUT/gen" "$OUT/http"
if [ "${1:-300}" != 0 ]; then
  # one process a variant, as the worker runs one job a process: a capped plan sees only its own job's memory
  end=$((SECONDS + ${1:-300}))
  for v in $(echo "${TRAIN:-worker,worker_cap13,worker_seed1,worker_seed2,trl}" | tr , " "); do
    left=$((end - SECONDS))
    if [ "$left" -lt 45 ]; then echo "train $v: skipped, ${left}s left"; continue; fi
    timeout "$left" python3 bench/train_gpu.py --checkpoint $CK --dataset .devsite-seed/instructions.jsonl \
      --only "$v" --peer-timeout 150 --out "$OUT/train/$v" > "$OUT/train/$v.log" 2>&1
    echo "train $v rc=$? $(date -u +%T)"
    grep -E "cuda_plan|FAILED|Error" "$OUT/train/$v.log" | cut -c1-400 | head -4
    tail -3 "$OUT/train/$v.log" | cut -c1-250
  done
  tar -czf "$OUT/train.tgz" -C "$OUT" train && rm -rf "$OUT/train"  # a call brings back few files
fi
if [ "${2:-120}" != 0 ]; then
  timeout "${2:-120}" python3 bench/analyze_gpu.py --checkpoint $CK --adapters 1 \
    --only generation_batch_1,generation_batch_32 --out "$OUT/gen" > "$OUT/gen/log.txt" 2>&1
  echo "gen rc=$?"; date -u
  grep -E "tokens_per_s|batch" "$OUT"/gen/*.json | head -12
fi
if [ "${3:-200}" != 0 ]; then
  # shellcheck disable=SC2086 # HTTP_ARGS is a list of options
  timeout "${3:-200}" python3 bench/http_latency.py --checkpoint $CK --out "$OUT/http" ${HTTP_ARGS:-} \
    > "$OUT/http/log.txt" 2>&1
  echo "http rc=$?"; date -u
  tail -40 "$OUT/http/log.txt" | cut -c1-250
fi
for part in gen http; do  # a call brings back few files: one archive a part
  if [ -n "$(ls -A "$OUT/$part")" ]; then tar -czf "$OUT/$part.tgz" -C "$OUT" "$part"; fi
  rm -rf "${OUT:?}/$part"
done
