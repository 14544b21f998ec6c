"""The `wanda-stream` command: argparse subcommands over the typed core.

Exit status: 0 success, 2 bad arguments or input (one line on stderr), 75 stopped by a
signal with the state saved (resume with --resume), 1 unexpected internal error.
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from pathlib import Path

from wanda_stream.errors import InputError, Interrupted

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_TEMPFAIL = 0, 1, 2, 75

PRUNE_EXAMPLES = """examples:
  # 50% unstructured Wanda, calibrated on C4 (128 x 2048 tokens, seed 0) like the paper
  wanda-stream prune ./Llama-2-7b-hf ./Llama-2-7b-wanda50
  # SparseGPT (weights updated), or Wanda with OWL's per-block sparsities at 70%
  wanda-stream prune ./model ./model-sgpt50 --method sparsegpt
  wanda-stream prune ./model ./model-owl70 --sparsity 0.7 --sparsity-profile owl
  # 2:4 semi-structured, offline calibration text, evaluated on WikiText-2 in the same pass
  wanda-stream prune ./model ./model-2of4 --pattern 2:4 --calib pydoc --eval-data ./wiki.test.raw
  # a batch job: resume after preemption, JSON progress lines for the log collector
  wanda-stream prune ./model ./out --resume --log-format json
  # a smaller model for every runtime: 25% of the MLP channels and 6 blocks removed, a stock checkpoint
  wanda-stream prune ./model ./model-small --drop-ffn 0.25 --drop-blocks 6
  # structure first, then 2:4 SparseGPT masks on what is left, in one pass
  wanda-stream prune ./model ./model-s24 --drop-ffn 0.25 --method sparsegpt --pattern 2:4
  wanda-stream prune ./qwen3-30b-a3b ./qwen3-reap50 --drop-experts 0.5
  # a sweep: four configurations, each block read once for all, into ./sweep/<name>/ each
  wanda-stream prune ./model ./sweep --sweep wanda:0.5,wanda:0.6,sparsegpt:0.6,sparsegpt:2:4 --eval-data wikitext2
  wanda-stream prune ./model ./sweep --sweep plan.yaml    # name: "prune flags", one line per configuration
  # data-parallel calibration on 8 GPUs (gloo on CPUs); the same output as one process
  torchrun --nproc-per-node 8 -m wanda_stream prune ./model ./out --resume

exit status: 0 done (or, with --resume, already done); 2 bad input, not enough disk or memory, or disk
full (one line on stderr); 75 stopped by SIGTERM/SIGINT with its state saved: rerun with --resume;
1 internal error (a bug). See docs/batch.md.
"""
EVAL_EXAMPLES = """examples:
  wanda-stream eval ./Llama-2-7b-wanda50 --data wikitext2 --seqlen 2048
  wanda-stream eval ./model --data ./wiki.test.raw --seqlen 512 --max-windows 40 --json
  # lm-evaluation-harness tasks (pip install 'wanda-stream[eval]'), every request through each block once
  wanda-stream eval ./model --tasks boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa
  wanda-stream eval ./model --tasks wikitext_next_sentence --include-path ./tasks --limit 100 --json

--tasks: log-likelihood tasks only (multiple choice, perplexity); generation tasks are refused. A task
evaluation stopped by SIGTERM/SIGINT exits 75 and cannot be resumed: rerun it.
"""
INSPECT_EXAMPLES = """examples:
  wanda-stream inspect ./Llama-2-7b-wanda50
  wanda-stream inspect ./model-2of4 --pattern 2:4 --json
"""
STATUS_EXAMPLES = """examples:
  wanda-stream status ./out            # the output directory (its .wanda-stream work dir)
  wanda-stream status /scratch/run-7   # a --work-dir
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each flag's default, and the examples epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # Unset (None) and off (False) defaults say nothing, and a help text may explain its default itself.
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (argparse's own default prints usage too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"wanda-stream: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_INPUT)


def _expert_group(value: str) -> int | None:
    """--expert-group: 'auto' (None) or a count of experts, 0 for whole blocks."""
    if value == "auto":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"'{value}' is not a number of experts or 'auto'")
    return int(value)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (auto = cuda when available)")
    p.add_argument("--compute-dtype", default="auto",
                   help="auto|float32|bfloat16|float16 (auto = checkpoint dtype on GPU, float32 on CPU)")
    p.add_argument("--max-activation-memory", default=None,
                   help="memory budget for one micro-batch of hidden states (and, in prune, the hidden states "
                        "kept between blocks when they fit beside it), e.g. 2GB (default: a share of free memory)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per micro-batch (default: as many as --max-activation-memory allows, up to 8)")


def _add_method(p: argparse.ArgumentParser) -> None:
    from wanda_stream.methods import METHODS, dataclass_flags, option_flags
    from wanda_stream.methods.profiles import PROFILES, Owl

    p.add_argument("--method", choices=tuple(METHODS), default="wanda",
                   help="; ".join(f"{name}: {cls.paper}" for name, cls in METHODS.items()))
    p.add_argument("--sparsity-profile", choices=PROFILES, default="uniform",
                   help="uniform: every block gets --sparsity; owl: OWL's outlier-weighted sparsity per block "
                        "(an extra pass over the dense model), averaging --sparsity")
    owned = [(flag, f"--method {m}", f) for flag, (m, f) in option_flags().items()]
    owned += [(flag, "--sparsity-profile owl", f) for flag, f in dataclass_flags(Owl).items()]
    for flag, owner, f in owned:
        p.add_argument(flag, type=type(f.default), default=None,
                       help=f"{f.metadata['help']} (with {owner}; default {f.default})")


def _add_structure(p: argparse.ArgumentParser) -> None:
    from wanda_stream.model.shrink import BLOCK_SCORES

    g = p.add_argument_group("structured pruning (a smaller standard checkpoint; combines with --method/--pattern)")
    g.add_argument("--drop-blocks", type=int, default=0, metavar="N",
                   help="remove N whole decoder blocks, chosen by --block-score on a pass over the dense model")
    g.add_argument("--block-score", choices=BLOCK_SCORES, default="bi",
                   help="bi: ShortGPT's block influence, the N lowest; angular: Gromov et al.'s angular distance, "
                        "the N contiguous blocks where it is smallest")
    g.add_argument("--drop-ffn", type=float, default=0.0, metavar="R",
                   help="remove round(R x intermediate) channels of every MLP (Wanda-sp score), down_proj refit")
    g.add_argument("--drop-heads", type=float, default=0.0, metavar="R",
                   help="remove round(R x heads) query heads of every attention (within each KV group, or whole "
                        "groups), o_proj refit")
    g.add_argument("--no-refit", action="store_true",
                   help="keep the weights that read the removed channels and heads as they are (no least-squares refit)")
    g.add_argument("--drop-experts", type=float, default=0.0, metavar="R",
                   help="remove int(R x experts) routed experts of every MoE block, the lowest by REAP's saliency "
                        "(router weight x expert output norm over the tokens routed to it), with their router rows")


def _add_reconstruct(p: argparse.ArgumentParser) -> None:
    from wanda_stream.methods import dataclass_flags
    from wanda_stream.methods.reconstruct import Reconstruct

    g = p.add_argument_group("block-output reconstruction (after any method's masks, structural ones too)")
    g.add_argument("--reconstruct", action="store_true",
                   help="after each block's masks, fit its kept weights (mask held) so that the pruned block's "
                        "outputs match the dense block's on the calibration inputs (Adam, whole block)")
    for flag, f in dataclass_flags(Reconstruct).items():
        g.add_argument(flag, type=type(f.default), default=None,
                       help=f"{f.metadata['help']} (with --reconstruct; default {f.default})")


def _add_revision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of a hub model id given as MODEL_DIR (default: main)")


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("bar", "json"), default="bar",
                   help="bar: a progress bar on a terminal, and one plain line per block (block, elapsed, ETA, "
                        "peak RSS) when stderr is not a terminal (a batch job's log); json: one JSON object per line")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _add_task_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("lm-evaluation-harness tasks (instead of --data perplexity)")
    t.add_argument("--tasks", default=None, help="comma-separated lm-eval task names, e.g. boolq,rte,arc_easy")
    t.add_argument("--include-path", type=Path, default=None, help="directory of extra task YAMLs (lm-eval's flag)")
    t.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    t.add_argument("--limit", type=float, default=None, help="at most this many documents per task (<1: a fraction)")
    t.add_argument("--output-path", type=Path, default=None, help="also save lm-eval's results and samples here")


def build_parser() -> argparse.ArgumentParser:
    from wanda_stream.run.dist import DEFAULT_TIMEOUT_S
    from wanda_stream.model.families import TESTED_FAMILIES

    supported = (f"supported and tested model types: {', '.join(TESTED_FAMILIES)} "
                 "(decoder-only causal LMs of transformers; see docs/families.md)")
    parser = _Parser(prog="wanda-stream", description="Prune LLMs with Wanda, one decoder block at a time.",
                     epilog=supported)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a checkpoint", epilog=PRUNE_EXAMPLES,
                       formatter_class=_Formatter,
                       description="Prune the decoder linears (and MoE experts, per expert) of a Hugging Face "
                                   f"safetensors checkpoint; {supported}.")
    p.add_argument("model_dir", type=Path,
                   help="input checkpoint directory (never modified), or a hub model id ORG/NAME")
    p.add_argument("output_dir", type=Path, help="where the pruned checkpoint is written")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of each decoder linear to remove, 0<s<1 (default: 0.5); beside a --drop-* flag, "
                        "no masks unless given")
    p.add_argument("--pattern", default="unstructured", help="unstructured|2:4|4:8|N:M (N:M implies sparsity N/M)")
    p.add_argument("--sweep", default=None, metavar="SPEC",
                   help="several configurations in one pass (each block read once), each a complete output in "
                        "OUTPUT_DIR/NAME: comma-separated [NAME=]METHOD:SPARSITY or [NAME=]METHOD:N:M, or a "
                        ".json/.yaml file mapping NAME to its prune flags; the other flags apply to all, an "
                        "item's sparsity or pattern replaces both of theirs")
    _add_method(p)
    _add_structure(p)
    _add_reconstruct(p)
    p.add_argument("--calib", default="c4",
                   help="c4|wikitext2|pydoc|hub:ORG/NAME[:CONFIG][@SPLIT]|FILE|DIR (.txt, .jsonl/.json, .parquet)")
    p.add_argument("--calib-field", choices=("text", "messages"), default=None,
                   help="the record field to calibrate on (default: 'messages' where a record has a list of "
                        "them, else 'text')")
    p.add_argument("--chat-template", choices=("auto", "never"), default="auto",
                   help="auto: render records' 'messages' with the model's chat template; never: use 'text' only")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--save-dtype", default=None,
                   help="float32|bfloat16|float16: the output's floating-point dtype (default: as stored; "
                        "FP8 and MXFP4 weights are dequantized to bfloat16)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per calibration window (default: min(2048, the model's context))")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice of calibration windows")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="hidden states and run state (default OUTPUT_DIR/.wanda-stream)")
    p.add_argument("--keep-work-dir", action="store_true", help="keep the work dir after success")
    p.add_argument("--eval-data", default=None, help="also report perplexity on this SPEC, in the same pass")
    p.add_argument("--eval-windows", type=int, default=None, help="at most this many evaluation windows")
    p.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window length (default --seqlen)")
    p.add_argument("--eval-tasks", default=None,
                   help="also run these lm-eval tasks (comma-separated) on the pruned model, in the same pass")
    p.add_argument("--eval-include-path", type=Path, default=None, help="directory of extra task YAMLs")
    p.add_argument("--eval-num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--eval-limit", type=float, default=None, help="at most this many documents per task")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (or start one)")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier run or output and start over")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="under torchrun: seconds a rank waits for the others at a collective before giving up "
                        "(exit 75); must exceed the longest block")
    p.add_argument("--no-prefetch", action="store_true",
                   help="read, compute and write in turn (no overlap; for benchmarking it)")
    p.add_argument("--states-on-disk", action="store_true",
                   help="read hidden states back from their files every block even when memory holds them "
                        "(default: in memory when they fit --max-activation-memory, the files only the resume point)")
    p.add_argument("--expert-group", type=_expert_group, default=None, metavar="N|auto",
                   help="routed experts of a MoE block held in memory at once: 0 = whole blocks; N = the block's "
                        "other tensors stay, its experts are read, observed, pruned and written N at a time "
                        "(host memory bounded by a group, not the block: DeepSeek-V3's 23 GB blocks); auto "
                        "(default): whole blocks unless a block's experts take over 1/8 of the device's memory")
    _add_revision(p)
    _add_device(p)
    _add_progress(p)

    e = sub.add_parser("eval", help="streamed perplexity", epilog=EVAL_EXAMPLES,
                       formatter_class=_Formatter,
                       description="Perplexity over non-overlapping windows, one block at a time.")
    e.add_argument("model_dir", type=Path, help="checkpoint directory, or a hub model id ORG/NAME")
    e.add_argument("--data", default="wikitext2", help="wikitext2|pydoc|FILE|DIR")
    e.add_argument("--seqlen", type=int, default=None,
                   help="tokens per evaluation window (default: min(2048, the model's context))")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows (default: all)")
    e.add_argument("--work-dir", type=Path, default=None, help="hidden states (default: a temporary directory)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _add_revision(e)
    _add_task_args(e)
    _add_device(e)
    _add_progress(e)

    i = sub.add_parser("inspect", help="sparsity of a checkpoint", epilog=INSPECT_EXAMPLES,
                       formatter_class=_Formatter,
                       description="Per-matrix sparsity of the decoder linears, read one tensor at a time.")
    i.add_argument("model_dir", type=Path, help="checkpoint directory, or a hub model id ORG/NAME")
    _add_revision(i)
    i.add_argument("--pattern", default=None, help="also check this N:M pattern, e.g. 2:4")
    i.add_argument("--summary", action="store_true", help="totals per layer kind and per block, not per matrix")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="draw the run's per-block error, sparsity and OWL outlier ratios from MODEL_DIR's report "
                        "(needs matplotlib: pip install 'wanda-stream[plot]')")

    s = sub.add_parser("status", help="state of a run", epilog=STATUS_EXAMPLES,
                       formatter_class=_Formatter,
                       description="What run a work or output directory holds and whether it can resume.")
    s.add_argument("path", type=Path, help="a --work-dir or an OUTPUT_DIR")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _version() -> str:
    from wanda_stream import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the model card
    try:
        from wanda_stream import commands

        return getattr(commands, f"cmd_{args.command}")(args)
    except InputError as e:
        print(f"wanda-stream: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except Interrupted as e:
        print(f"wanda-stream: {e}", file=sys.stderr)  # the message says where the state is and how to resume
        return EXIT_TEMPFAIL
    except KeyboardInterrupt:
        print("wanda-stream: interrupted", file=sys.stderr)
        return EXIT_TEMPFAIL
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # a full disk is the user's to fix, not a bug
            where = e.filename or "the output or work directory"
            print(f"wanda-stream: error: cannot write {where} ({e.strerror}); free space (or raise the file-size "
                  "limit) and rerun the same command with --resume", file=sys.stderr)
            return EXIT_INPUT
        traceback.print_exc()
        return EXIT_INTERNAL
    except Exception:  # noqa: BLE001 - the one place that turns bugs into exit 1 with the traceback
        traceback.print_exc()
        print("wanda-stream: internal error (a bug); please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
