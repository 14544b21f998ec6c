#!/bin/bash
# Prune across several nodes of GPUs as one SLURM job: data-parallel calibration on torch.distributed.
#
# srun starts one torchrun launcher per node; the launchers meet at the first node (c10d rendezvous)
# and each starts GPUS_PER_NODE ranks (NCCL). Every rank reads each block (a node's ranks share its
# page cache), calibrates on its share of the windows, and rank 0 writes the output. The result is
# the single-process result (see docs/batch.md). OUT must be on a file system every node sees: each
# rank keeps its hidden states in OUT/.wanda-stream (or --work-dir).
#
# Preemption and time limits: SLURM sends SIGTERM to this batch shell 5 minutes before the limit;
# it is passed to srun, which passes it to every launcher, which passes it to its ranks. The ranks
# agree to stop at the end of the block in flight, save the state and exit 75. torchrun reports any
# failed rank as exit 1, so what to do next is read from the run's own state (`wanda-stream status`):
# a run that can resume is requeued, and the requeued job's same command line continues it, at most
# MAX_REQUEUES times (SLURM counts the restarts in SLURM_RESTART_COUNT): a job that fails the same way
# on every start (a NCCL misconfiguration, a card short of memory) stops instead of looping.
#
# Submit: sbatch docs/slurm_multinode.sh
#SBATCH --job-name=wanda-prune-multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=wanda-prune-%j.log
#SBATCH --signal=B:TERM@300

set -u

MODEL=${MODEL:-/datasets/models/Llama-2-70b-hf}
OUT=${OUT:-/shared/$USER/Llama-2-70b-wanda50}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PRUNE_ARGS=${PRUNE_ARGS:-"--sparsity 0.5 --calib c4 --nsamples 128 --seqlen 2048"}
RDZV_PORT=${RDZV_PORT:-29500}
MAX_REQUEUES=${MAX_REQUEUES:-10}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# shellcheck disable=SC2086  # PRUNE_ARGS is a list of flags
srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD:$RDZV_PORT" --rdzv-id "wanda-$SLURM_JOB_ID" \
    -m wanda_stream prune "$MODEL" "$OUT" $PRUNE_ARGS --resume --log-format json &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"
rc=$?
while kill -0 "$pid" 2>/dev/null; do  # wait returns early when the trap runs; wait for the real status
    wait "$pid"
    rc=$?
done

state=$(wanda-stream status "$OUT" --json 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("finished" if d["state"] == "finished" else "resume" if d.get("can_resume") else "stuck")' || echo none)
case $state in
    finished) echo "done: $OUT"; exit 0 ;;
    resume)
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
            echo "stopped (torchrun exit $rc) after $MAX_REQUEUES requeues; not requeueing again: see the errors above," \
                 "then resubmit (the run resumes)"
            exit "$rc"
        fi
        echo "stopped (torchrun exit $rc); requeueing ($(( ${SLURM_RESTART_COUNT:-0} + 1 )) of $MAX_REQUEUES)"
        scontrol requeue "$SLURM_JOB_ID"; exit 75 ;;
    *) echo "failed (torchrun exit $rc, run state: $state): see the errors above"; exit "$rc" ;;
esac
