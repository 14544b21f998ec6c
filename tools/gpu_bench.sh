#!/usr/bin/env bash
# Prune a llama-2-7b-shaped bf16 checkpoint (13.5 GB, random weights) on CUDA with the paper's
# calibration (128 x 2048 tokens), streamed with and without prefetch and in memory, and print the
# benchmark table. Everything lives on local disk under BENCH_DIR and is deleted at the end.
#
#   tools/gpu_bench.sh                      # BENCH_DIR=/tmp/wanda-gpu-bench, all three runs
#   BENCH_DIR=/scratch/b RUNS=streamer tools/gpu_bench.sh
#
# Budget: about 8 minutes on one H100/H200-class card with a local NVMe disk (generation ~1 min,
# each run 1-2 min). Each step has a hard timeout so an unexpectedly slow machine still reports.
set -euo pipefail

cd "$(dirname "$0")/.."
BENCH_DIR=${BENCH_DIR:-/tmp/wanda-gpu-bench}
RUNS=${RUNS:-streamer,streamer-no-prefetch,in-memory}
PRESET=${PRESET:-llama-2-7b}
PY=${PYTHON:-python}
START=$(date +%s)

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_bench: no CUDA device visible to torch; nothing to measure" >&2
  exit 1
fi
mkdir -p "$BENCH_DIR"
trap 'rm -rf "$BENCH_DIR/$PRESET" "$BENCH_DIR"/bench-*/' EXIT

echo "== $(date -u '+%Y-%m-%d %H:%M UTC') on $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
echo "== disk: $(df -h "$BENCH_DIR" | tail -1)"

echo "== CUDA-only tests (pinned reads, prune and eval on the GPU against the CPU reference)"
# Seconds, not minutes; a failure is reported and the benchmark still runs.
if ! timeout 120 "$PY" -m pytest -q -rs tests/test_cuda.py tests/test_checkpoint.py; then
  echo "gpu_bench: CUDA TESTS FAILED (see above)" >&2
fi

echo "== generating $PRESET (bf16, random numbers drawn on the GPU)"
rm -rf "$BENCH_DIR/$PRESET"
timeout 180 "$PY" tools/make_synthetic_model.py "$PRESET" "$BENCH_DIR/$PRESET" --dtype bfloat16 --device cuda

echo "== pruning: 50% wanda, 128 x 2048 tokens of pydoc, bf16 compute on cuda ($RUNS)"
# What is left of 8 minutes, shared by the runs; a run that overruns its share is reported as timed out.
LEFT=$(( 470 - ($(date +%s) - START) ))
NRUNS=$(echo "$RUNS" | tr ',' '\n' | grep -c .)
"$PY" tools/bench_prune.py "$BENCH_DIR/$PRESET" --device cuda --nsamples 128 --seqlen 2048 \
  --calib pydoc --runs "$RUNS" --work "$BENCH_DIR" --json "$BENCH_DIR/gpu_bench.json" \
  --timeout $(( LEFT / NRUNS - 5 ))

if [ -n "${OUT:-}" ]; then
  cp "$BENCH_DIR/gpu_bench.json" "$BENCH_DIR"/bench-*.log "$OUT"/ 2>/dev/null || true
fi
echo "== total $(( $(date +%s) - START )) s"
