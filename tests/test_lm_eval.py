"""The streamed lm-eval backend: the scoring kernel, request buckets, and equality with lm-eval's own `hf` model."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, WIKI_TEST, small_text
from wanda_stream.eval.loglik import (
    Request, model_input, per_request, plan_buckets, rolling_windows, scored_positions, token_scores,
)

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]')")

PAPER_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
TOY_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: {target}
metric_list:
  - metric: {metric}
"""


def write_toy_task(root: Path, name: str = "toy_mc", output_type: str = "multiple_choice", n: int = 16) -> Path:
    """A local multiple-choice task: contexts from 1 to ~120 words (some past the tiny model's 256 tokens),
    some ending in spaces (moved to the continuation by lm-eval), 4 choices each."""
    rng = random.Random(1)
    words = "the cat sat on a mat while dogs ran far away into the night and sky was blue".split()
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.jsonl", "w") as f:
        for i in range(n):
            ctx = say(rng.choice([1, 5, 30, 120])) + (" " if i % 3 == 0 else "")
            f.write(json.dumps({"ctx": ctx, "choices": [say(rng.randint(1, 8)) for _ in range(4)],
                                "label": rng.randrange(4), "gold": "x"}) + "\n")
    gen = output_type == "generate_until"
    (root / f"{name}.yaml").write_text(TOY_YAML.format(
        name=name, data=root / f"{name}.jsonl", output_type=output_type,
        target="gold" if gen else "label", metric="exact_match" if gen else "acc"))
    return root


# ---- the pure parts ---------------------------------------------------------------------------
def test_token_scores_golden() -> None:
    """Hand-checked: logits [ln2, 0, 0] give p(0) = 2/4; [0, ln3, 0] give p(1) = 3/5 and p(2) = 1/5."""
    rows = torch.tensor([[math.log(2), 0.0, 0.0], [0.0, math.log(3), 0.0], [0.0, math.log(3), 0.0]])
    logp, greedy = token_scores(lambda h: h, rows, torch.tensor([0, 1, 2]), chunk_rows=1)
    assert torch.allclose(logp, torch.tensor([math.log(0.5), math.log(0.6), math.log(0.2)]))
    assert greedy.tolist() == [True, True, False]
    (a, ga), (b, gb) = per_request(logp, greedy, [2, 1])
    assert a == pytest.approx(math.log(0.3)) and ga is True
    assert b == pytest.approx(math.log(0.2)) and gb is False


def test_buckets_pad_right_and_truncate_like_lm_eval() -> None:
    reqs = [Request([1, 2, 3], [4, 5]), Request(list(range(1, 40)), [7]), Request([9] * 100, [8] * 3)]
    assert model_input(reqs[2], 64) == ([9] * 100 + [8] * 3)[-65:][:-1]  # HFLM's causal input
    buckets = plan_buckets(reqs, 64)
    assert [b.seqlen for b in buckets] == [16, 64]
    assert buckets[0].members == [0] and buckets[1].members == [1, 2]
    assert buckets[0].tokens[0, :4].tolist() == [1, 2, 3, 4] and buckets[0].meta[0].tolist() == [0, 4, 2]
    assert buckets[0].targets[0, :4].tolist() == [2, 3, 4, 5]
    assert buckets[1].meta[:, 1:].tolist() == [[39, 1], [64, 3]]
    rows, pos, targets, sizes = scored_positions(buckets[1], 0, 2)
    assert rows.tolist() == [0, 1, 1, 1] and pos.tolist() == [38, 61, 62, 63]
    assert targets.tolist() == [7, 8, 8, 8] and sizes == [1, 3]


@pytest.mark.parametrize("n", [1, 7, 8, 9, 30])
def test_rolling_windows_match_lm_eval(n: int) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 5, 8, 1)]
    assert [(r.context, r.continuation) for r in rolling_windows(tokens, 5, 8)] == theirs


# ---- equality with lm-eval's HF model -----------------------------------------------------------
def _instances(task_dir: Path, name: str) -> list:
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(task_dir), include_defaults=False).load([name])["tasks"][name]
    task.build_all_requests(rank=0, world_size=1)
    return task.instances


def _compare(model_dir: Path, task_dir: Path, name: str, max_length: int | None = None) -> dict:
    """Per-request log-likelihoods and greedy flags of both backends on a local task, and their accuracies."""
    from lm_eval.models.huggingface import HFLM

    from wanda_stream.eval.lm_eval_backend import WandaStreamLM

    ours = WandaStreamLM(str(model_dir), device="cpu", dtype="float32", max_length=max_length)
    hf = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=8, max_length=max_length)
    insts = _instances(task_dir, name)
    a, b = ours.loglikelihood(insts), hf.loglikelihood(insts)
    return {"diff": max(abs(x[0] - y[0]) for x, y in zip(a, b)), "greedy_same": [x[1] for x in a] == [y[1] for y in b],
            "n": len(a), "acc": [_accuracy(insts, r) for r in (a, b)], "ours": ours, "hf": hf}


def _accuracy(insts: list, scores: list[tuple[float, bool]]) -> float:
    by_doc: dict[int, list[tuple[int, float]]] = {}
    for inst, (ll, _) in zip(insts, scores):
        by_doc.setdefault(inst.doc_id, []).append((inst.idx, ll))
    gold = {inst.doc_id: inst.doc["label"] for inst in insts}
    return sum(max(v, key=lambda t: t[1])[0] == gold[d] for d, v in by_doc.items()) / len(by_doc)


def test_loglikelihoods_equal_hf_tiny(tiny_model: Path, tmp_path: Path) -> None:
    """Every request of a local task (truncated ones included) within 1e-4 of lm-eval's `hf`, same greedy flags."""
    res = _compare(tiny_model, write_toy_task(tmp_path / "tasks"), "toy_mc")
    assert res["n"] == 64
    assert res["diff"] < 1e-4 and res["greedy_same"]
    assert res["acc"][0] == res["acc"][1]


def test_rolling_loglikelihood_equal_hf_tiny(tiny_model: Path) -> None:
    """Perplexity-style requests over several 48-token windows, as lm-eval's `hf` scores them."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from wanda_stream.eval.lm_eval_backend import WandaStreamLM

    # Distinct text: on repeated text, HFLM's own result depends on its batch size (its one-token-continuation
    # cache groups windows whose context+continuation coincide), and equals ours at batch_size=1.
    texts = [small_text()[k * 1000 : k * 1000 + size] for k, size in enumerate((20, 300, 900))]
    insts = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours = WandaStreamLM(str(tiny_model), device="cpu", max_length=48).loglikelihood_rolling(insts)
    hf = HFLM(pretrained=str(tiny_model), dtype="float32", device="cpu", batch_size=4, max_length=48)
    assert max(abs(x - y) for x, y in zip(ours, hf.loglikelihood_rolling(insts))) < 1e-4


@pytest.mark.slow
def test_loglikelihoods_equal_hf_smollm2(smollm2: Path, tmp_path: Path) -> None:
    """SmolLM2-135M on 24 items of the wikitext_next_sentence task: per request within 1e-4, same accuracy."""
    if not WIKI_TEST.is_file():
        pytest.skip(f"{WIKI_TEST} not found")
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_next_sentence_task.py"), str(WIKI_TEST),
                    str(tmp_path), "--items", "24"], check=True)
    res = _compare(smollm2, tmp_path, "wikitext_next_sentence")
    assert res["n"] == 96
    assert res["diff"] < 1e-4 and res["greedy_same"]
    assert res["acc"][0] == res["acc"][1]


# ---- the command line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin_tasks() -> object:
    """lm-eval's index of its built-in tasks (seconds to build: shared by the tests that need it)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def test_eval_tasks_json_is_lm_eval_results(tiny_model: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from wanda_stream.cli import main

    task_dir = write_toy_task(tmp_path / "tasks", n=8)
    code = main(["eval", str(tiny_model), "--tasks", "toy_mc", "--include-path", str(task_dir), "--device", "cpu",
                 "--json", "--output-path", str(tmp_path / "out")])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert 0.0 <= res["results"]["toy_mc"]["acc,none"] <= 1.0 and res["n-samples"]["toy_mc"]["effective"] == 8
    saved = list((tmp_path / "out").rglob("results_*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["results"] == res["results"]
    assert len(list((tmp_path / "out").rglob("samples_toy_mc_*.jsonl"))) == 1


def test_lm_eval_command_with_wanda_stream_model(tiny_model: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """lm-eval's own command line (`wanda-stream-lm-eval`, the console script) with the model registered."""
    import functools
    import logging

    import lm_eval.tasks
    import lm_eval.utils

    # lm-eval's command line gives its logger a handler on the stderr of this moment, which pytest closes
    # after this test: every later lm-eval log line in this process printed a "Logging error" stack. Its
    # logging is put back as it was (the handler, the level, the flag that makes it add one only once).
    log = logging.getLogger("lm_eval")
    monkeypatch.setattr(log, "handlers", list(log.handlers))
    monkeypatch.setattr(log, "propagate", log.propagate)
    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", lm_eval.utils._LOGGING_CONFIGURED)  # noqa: SLF001
    request.addfinalizer(functools.partial(log.setLevel, log.level))

    from wanda_stream.eval import lm_eval_backend

    task_dir = write_toy_task(tmp_path / "tasks", n=4)
    # Only the local task: indexing lm-eval's built-in tasks takes its command line many seconds here.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    monkeypatch.setattr(sys, "argv", ["wanda-stream-lm-eval", "--model", "wanda-stream", "--model_args",
                                      f"pretrained={tiny_model}", "--tasks", "toy_mc", "--include_path",
                                      str(task_dir), "--device", "cpu"])
    lm_eval_backend.main()
    out = capsys.readouterr().out
    assert "|toy_mc|" in out and "acc" in out


def test_paper_tasks_resolve_by_name(builtin_tasks: object) -> None:
    assert [t for t in PAPER_TASKS if t not in builtin_tasks.all_tasks] == []


def test_unknown_task_names_it(builtin_tasks: object) -> None:
    from wanda_stream.errors import InputError
    from wanda_stream.eval.task_eval import load_tasks

    with pytest.raises(InputError, match=r"unknown task\(s\) no_such_task;"):
        load_tasks(builtin_tasks, ["arc_easy", "no_such_task"])


def test_offline_data_set_one_line_exit_2(tiny_model: Path, builtin_tasks: object, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A paper task whose hub data set cannot be reached: one line naming the data set, exit 2."""
    import datasets.config
    import huggingface_hub.constants

    from wanda_stream.eval import task_eval
    from wanda_stream.cli import main

    for mod in (datasets.config, huggingface_hub.constants):  # as HF_*_OFFLINE=1 at import time would set them
        monkeypatch.setattr(mod, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(task_eval, "task_manager", lambda names, include_path: builtin_tasks)  # the shared index
    assert main(["eval", str(tiny_model), "--tasks", "boolq", "--device", "cpu", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "wanda-stream: error: task boolq: data set aps/super_glue could not be loaded (Couldn't reach "
        "'aps/super_glue' on the Hub (OfflineModeIsEnabled)); connect to the Hugging Face hub once to cache it, "
        "or define the task on local files with --include-path"]


def test_generation_task_refused(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wanda_stream.cli import main

    task_dir = write_toy_task(tmp_path / "tasks", name="toy_gen", output_type="generate_until", n=2)
    assert main(["eval", str(tiny_model), "--tasks", "toy_gen", "--include-path", str(task_dir)]) == 2
    assert "task(s) toy_gen: free generation (generate_until) is not supported" in capsys.readouterr().err


def test_missing_lm_eval_one_line(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from wanda_stream.cli import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert main(["eval", str(tiny_model), "--tasks", "arc_easy"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "wanda-stream: error: --tasks needs lm-evaluation-harness, which is not installed: pip install 'wanda-stream[eval]'"]


def test_sigterm_during_task_eval_exits_75(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wanda_stream import cli
    from wanda_stream.storage import state as state_mod

    task_dir = write_toy_task(tmp_path / "tasks", n=4)
    monkeypatch.setenv(state_mod.KILL_ENV, "hidden_write:2:TERM")
    work = tmp_path / "work"
    code = cli.main(["eval", str(tiny_model), "--tasks", "toy_mc", "--include-path", str(task_dir), "--device", "cpu",
                     "--quiet", "--work-dir", str(work), "--batch-size", "1"])
    assert code == 75
    assert list(work.iterdir()) == []  # hidden states removed


# ---- prune --eval-tasks -------------------------------------------------------------------------
def _prune_with_tasks(model: Path, out: Path, task_dir: Path, *extra: str) -> int:
    from wanda_stream.cli import main

    return main(["prune", str(model), str(out), "--method", "magnitude", "--device", "cpu", "--quiet",
                 "--seqlen", "64", "--eval-tasks", "toy_mc", "--eval-include-path", str(task_dir), "--batch-size", "2",
                 *extra])


def test_prune_eval_tasks_equal_eval_of_the_output(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The suite scored inside the pruning pass (interrupted and resumed once) equals `eval --tasks` of the output."""
    from wanda_stream.storage import state as state_mod
    from wanda_stream.eval.lm_eval_backend import WandaStreamLM
    from wanda_stream.eval.task_eval import run_suite

    task_dir = write_toy_task(tmp_path / "tasks", n=8)
    out = tmp_path / "out"
    monkeypatch.setenv(state_mod.KILL_ENV, "block_done:1:TERM")
    assert _prune_with_tasks(tiny_model, out, task_dir) == 75
    monkeypatch.delenv(state_mod.KILL_ENV)
    err = capsys.readouterr().err
    assert "Logging error" not in err  # no handler of an earlier test's closed stderr (see the lm-eval CLI test)
    resume = err.split("Resume with: ")[1].split()
    assert resume[resume.index("--eval-tasks") + 1] == "toy_mc" and "--eval-include-path" in resume
    assert _prune_with_tasks(tiny_model, out, task_dir, "--resume") == 0
    inside = json.loads((out / "wanda_stream.json").read_text())["eval_tasks"]["results"]["toy_mc"]
    after = run_suite(WandaStreamLM(str(out), device="cpu"), ["toy_mc"], task_dir, None, None)["results"]["toy_mc"]
    assert inside["acc,none"] == after["acc,none"] and inside["sample_len"] == after["sample_len"] == 8


def test_prune_eval_tasks_on_two_ranks_equal_one_process(tiny_model: Path, tmp_path: Path) -> None:
    """Under torchrun the request buckets are shared out over the ranks (whole buckets, by tokens), the
    scores gathered on rank 0: the same lm-eval results as one process."""
    from tests.test_dist import finish, launch

    task_dir = write_toy_task(tmp_path / "tasks", n=8)
    single = tmp_path / "single"
    args = ["prune", str(tiny_model), str(tmp_path / "two"), "--method", "magnitude", "--device", "cpu", "--quiet",
            "--seqlen", "64", "--eval-tasks", "toy_mc", "--eval-include-path", str(task_dir), "--batch-size", "2",
            "--nsamples", "4"]
    assert _prune_with_tasks(tiny_model, single, task_dir, "--nsamples", "4") == 0
    results = finish(launch(args))
    assert [rc for rc, _ in results] == [0, 0], [err[-3000:] for _, err in results]
    want = json.loads((single / "wanda_stream.json").read_text())["eval_tasks"]
    got = json.loads((tmp_path / "two" / "wanda_stream.json").read_text())["eval_tasks"]
    assert got["results"] == want["results"]
