#!/usr/bin/env bash
# The prepared GPU check: the CUDA tests, wanda / sparsegpt / wanda+OWL on a llama-2-7b-shaped bf16
# checkpoint with 128 x 2048 tokens, kill and resume, streamed eval, 2 ranks under torchrun, 2:4
# inference matmuls, masks against the CPU, in under 10 minutes on one H200, as one table (see
# tools/gpu_bench.py for the steps). Installs nothing from outside: the package runs from this
# checkout (PYTHONPATH); when the Python found lacks torch/transformers and a local wheel cache is
# carried (WHEELS, default .ci/wheels), the missing packages come from it (pip --no-index).
#
#   tools/gpu_bench.sh                       # on the GPU machine; BENCH_DIR=/tmp/wanda-gpu-bench
#   tools/gpu_bench.sh --dry-run             # the same steps on the CPU with a tiny model (tested)
#   BENCH_DIR=/scratch/b tools/gpu_bench.sh --steps wanda-7b,2:4 --keep
#
# Python: $PYTHON, else the checkout's .venv, else python3, else python. The table, the JSON and
# every step's log are copied to $OUT when it is set. Exit 0 when every step is ok.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
elif command -v python3 >/dev/null 2>&1; then PY=python3
elif command -v python >/dev/null 2>&1; then PY=python
else echo "gpu_bench: no Python found (set PYTHON=/path/to/python)" >&2; exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c 'import torch, transformers, safetensors, tokenizers, psutil, pytest' 2>/dev/null; then
  WHEELS=${WHEELS:-.ci/wheels}
  if [ -d "$WHEELS" ]; then
    echo "gpu_bench: installing the missing packages from the local wheel cache $WHEELS" >&2
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e ".[test]" || exit 2
  else
    echo "gpu_bench: $PY ($("$PY" -V 2>&1)) lacks torch, transformers, safetensors, tokenizers, psutil or pytest," \
         "and no local wheel cache is carried (WHEELS=$WHEELS); set PYTHON to an interpreter that has them" >&2
    exit 2
  fi
fi
exec "$PY" tools/gpu_bench.py "$@"
