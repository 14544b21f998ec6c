#!/usr/bin/env python3
"""An independent in-memory magnitude pruner, to check `--method magnitude` figure for figure.

Loads the whole model with transformers, removes the lowest |W| of every decoder linear (per matrix,
per output row, or the 2 lowest of every 4 consecutive inputs; stable on ties) and saves it; then
measure it with `wanda-stream eval` on the same windows as the streamed run.

    python tools/magnitude_reference.py MODEL /tmp/mag --rule matrix --sparsity 0.5
    wanda-stream eval /tmp/mag --data ../shared/data/wikitext2/wiki.test.raw --seqlen 512 --max-windows 40
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def magnitude_mask(w: torch.Tensor, rule: str, sparsity: float) -> torch.Tensor:
    """True where |w| is removed: `matrix` and `row` remove int(width * sparsity) lowest, `2:4` 2 of every 4."""
    a = w.abs()
    if rule == "2:4":
        groups = a.reshape(w.shape[0], -1, 4)
        idx = torch.argsort(groups, dim=2, stable=True)[:, :, :2]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(w.shape)
    flat = a if rule == "row" else a.reshape(1, -1)
    idx = torch.argsort(flat, dim=1, stable=True)[:, : int(flat.shape[1] * sparsity)]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True).reshape(w.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--rule", choices=["matrix", "row", "2:4"], default="matrix")
    p.add_argument("--sparsity", type=float, default=0.5)
    a = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    layers = model.get_decoder().layers
    with torch.no_grad():
        for mod in layers.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight[magnitude_mask(mod.weight, a.rule, a.sparsity)] = 0
    model.save_pretrained(a.out_dir)
    for f in a.model_dir.glob("tokenizer*"):
        shutil.copy(f, a.out_dir)


if __name__ == "__main__":
    main()
