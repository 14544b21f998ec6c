#!/usr/bin/env bash
# Run docs/slurm_multinode.sh on this host as if SLURM had given it two nodes: `srun` starts the
# torchrun launcher twice (one per "node", both on localhost), `scontrol` answers for SLURM. CPU, gloo.
#
#   bash tools/check_multinode.sh MODEL_DIR WORK_DIR
#
# 1. a stop (SIGTERM on both ranks at the same point) -> the script requeues; 1b. the same once
# MAX_REQUEUES restarts are used up -> it does not; 2. the requeued script finishes; 3. its output
# equals a single-process prune of the same command line, byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1
WORK=$2
rm -rf "$WORK" && mkdir -p "$WORK"
export PRUNE_ARGS="--calib pydoc --nsamples 8 --seqlen 32 --batch-size 2 --device cpu"
export MODEL OUT="$WORK/two-nodes" GPUS_PER_NODE=1 SLURM_JOB_ID=fake SLURM_NNODES=2 SLURM_JOB_NODELIST=localhost
export OMP_NUM_THREADS=1 RDZV_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')

srun() {  # one task per node, as --ntasks-per-node=1 asks; srun's exit status is its worst task's
    while [ "$1" != torchrun ]; do shift; done
    local a b
    "$@" > "$WORK/node0.log" 2>&1 & a=$!
    "$@" > "$WORK/node1.log" 2>&1 & b=$!
    local ra=0 rb=0
    wait "$a" || ra=$?
    wait "$b" || rb=$?
    return $(( ra > rb ? ra : rb ))
}
scontrol() {
    case $1 in
        show) echo 127.0.0.1 ;;
        requeue) echo "scontrol: requeue $2" ;;
    esac
}
export -f srun scontrol
export WORK

echo "== 1. stopped by SIGTERM in block 1 on both ranks"
set +e
WANDA_STREAM_KILL_AT=hidden_write:3:TERM bash docs/slurm_multinode.sh
rc=$?
set -e
[ "$rc" = 75 ] || { echo "expected the script to requeue (exit 75), got $rc"; cat "$WORK"/node*.log; exit 1; }
grep -h '"exitcode": 75\|exitcode *: 75\|stopped after block' "$WORK"/node*.log | head -4 || true

echo "== 1b. killed again (rank 0, SIGKILL after a block) once MAX_REQUEUES requeues are used up: not requeued"
set +e
SLURM_RESTART_COUNT=3 MAX_REQUEUES=3 WANDA_STREAM_KILL_AT=block_done:1 bash docs/slurm_multinode.sh \
    > "$WORK/capped.log" 2>&1
rc=$?
set -e
cat "$WORK/capped.log"
[ "$rc" != 75 ] && grep -q "after 3 requeues; not requeueing again" "$WORK/capped.log" \
    || { echo "expected no requeue past MAX_REQUEUES, got exit $rc"; exit 1; }

echo "== 2. the requeued job"
bash docs/slurm_multinode.sh

echo "== 3. against one process"
# shellcheck disable=SC2086
wanda-stream prune "$MODEL" "$WORK/one" $PRUNE_ARGS --quiet
python3 - "$WORK/two-nodes" "$WORK/one" <<'PY'
import hashlib, pathlib, sys
a, b = (pathlib.Path(p) for p in sys.argv[1:])
digest = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()
                    if p.is_file() and p.name not in ("wanda_stream.json", "README.md")}  # the card names the output dir
assert digest(a) == digest(b), "two-node output differs from the single-process output"
print(f"identical: {len(digest(a))} files (shards, index, config, generation config, tokenizer)")
PY
