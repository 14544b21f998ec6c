#!/bin/bash
# Prune a large model as a SLURM job that survives preemption and wall-clock limits.
#
# wanda-stream exits 75 (EX_TEMPFAIL) when SIGTERM/SIGINT stopped it with its state saved; this
# script then requeues the job, and the requeued job runs the same command line, which continues
# from the first incomplete block (--resume). A finished run exits 0 at once, so requeueing too
# often is harmless. Exit 2 (bad input, full disk) and 1 (a bug) are not retried: a person must look.
#
# Submit: sbatch docs/slurm_example.sh
#SBATCH --job-name=wanda-prune
#SBATCH --time=04:00:00
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=wanda-prune-%j.log
# SIGTERM to this batch shell 5 minutes before the time limit: time to finish the block in flight.
#SBATCH --signal=B:TERM@300

set -u

MODEL=/datasets/models/Llama-2-70b-hf
OUT=/scratch/$USER/Llama-2-70b-wanda50
WORK=/scratch/$USER/wanda-work/Llama-2-70b-wanda50   # hidden states: fast local or scratch disk

wanda-stream prune "$MODEL" "$OUT" --work-dir "$WORK" \
    --sparsity 0.5 --calib c4 --nsamples 128 --seqlen 2048 \
    --resume --log-format json &
pid=$!

# The batch shell gets the signal (B: above); pass it on and wait for the run to save its state.
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
wait "$pid"
rc=$?
while kill -0 "$pid" 2>/dev/null; do  # wait returns early when the trap runs; wait for the real status
    wait "$pid"
    rc=$?
done

case $rc in
    0)  echo "done: $OUT" ;;
    75|143)  # 143: SIGTERM came before wanda-stream had started; the saved state is consistent at any instant
        echo "stopped (exit $rc); requeueing"
        scontrol requeue "$SLURM_JOB_ID" ;;
    2)  echo "refused (bad input, or disk full): see the error above; fix it, then resubmit" ;;
    *)  echo "failed with exit status $rc" ;;
esac
exit "$rc"
