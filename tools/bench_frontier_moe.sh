#!/bin/bash
# DeepSeek-V3-shaped MoE blocks (all 256 routed experts, block FP8) pruned on the CPU with the experts streamed:
# peak RSS (ru_maxrss), per-block seconds, bytes read and written (docs/benchmarks.md, "DeepSeek-V3 MoE blocks").
#   tools/bench_frontier_moe.sh DATA_DIR [wanda] [reap]      # DATA_DIR needs ~95 GB free (23.9 GB in, 47 GB out)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${1:?usage: tools/bench_frontier_moe.sh DATA_DIR [wanda] [reap]}; shift
PY=${PYTHON:-python}
M=$DATA/ds-e256-fp8
cd "$ROOT"
[ -d "$M" ] || $PY tools/make_synthetic_fp8.py docs/bench_deepseek_v3_e256.json "$M" --shard-size 4 || exit 2
for name in "${@:-wanda reap}"; do
  for run in $name; do
    case $run in
      wanda) FLAGS="--method wanda --sparsity 0.5";;
      reap) FLAGS="--method wanda --sparsity 0.5 --drop-experts 0.5";;
      *) echo "unknown run '$run' (wanda, reap)" >&2; exit 2;;
    esac
    OUT=$DATA/out-$run
    rm -rf "$OUT"
    $PY -c "from tools.bench_prune import evict_files; from pathlib import Path; evict_files(Path('$M'))"
    echo "== $run $(date -u) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /usr/bin/time -v $PY -m wanda_stream prune "$M" "$OUT" --calib pydoc --nsamples 16 --seqlen 512 --device cpu \
        $FLAGS --log-format json > "$DATA/$run.log" 2>&1
    echo "rc=$? $(date -u) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $PY - "$OUT/wanda_stream.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for b in r["blocks"]:
    print("block", b["block"], "seconds", b["seconds"], b.get("streamed_experts"), "output_error", b.get("output_error"))
print({k: r[k] for k in ("io", "peak_rss_bytes", "seconds_this_process", "parameters") if k in r})
PY
    grep -E "Maximum resident|Elapsed|User time|System time" "$DATA/$run.log"
    rm -rf "$OUT"
  done
done
