"""Zero-shot (or few-shot) task accuracy through lm-evaluation-harness, with the streamed model.

lm-eval supplies task definitions, prompts, metrics and the results object; the model is
`lm_eval_backend.WandaStreamLM`. Tasks are loaded (and their data sets read) before any block runs,
so an unknown task, an unreachable data set or a generation task is refused in one line.
Resuming an interrupted task evaluation is not supported: a stopped run starts over.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from wanda_stream.errors import InputError
from wanda_stream.storage.state import StopFlag

if TYPE_CHECKING:
    from lm_eval.api.group import Group
    from lm_eval.api.model import LM
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

INSTALL_HINT = "pip install 'wanda-stream[eval]'"


@dataclass(frozen=True)
class TaskRun:
    """What to evaluate and how; the typed form of `eval --tasks`."""

    model_dir: Path
    tasks: list[str]
    include_path: Path | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    device: str = "auto"
    compute_dtype: str = "auto"
    batch_size: int | None = None
    progress: str = "quiet"
    work_dir: Path | None = None
    log_samples: bool = False


def require_lm_eval() -> None:
    """Raise InputError with the install command when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise InputError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from None


def task_manager(names: list[str], include_path: Path | None) -> TaskManager:
    """lm-eval's task index: of `include_path` alone when it defines every task named (indexing lm-eval's
    thousands of built-in YAMLs takes seconds), else of both."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    if not include_path.is_dir():
        raise InputError(f"--include-path {include_path}: not a directory of task YAML files")
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    if all(n in local.all_tasks for n in names):
        return local
    return TaskManager(include_path=str(include_path))


def load_tasks(tm: TaskManager, names: list[str]) -> list[Task | Group]:
    """lm-eval's tasks (and groups) by name, with their data sets read; InputError naming what fails."""
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise InputError(f"--tasks: unknown task(s) {', '.join(unknown)}; list them with `lm_eval ls tasks`, "
                         "or give local task YAMLs with --include-path")
    built: list[Task | Group] = []
    for name in names:
        try:
            with _quiet_lm_eval():
                loaded = tm.load([name])
        except (OSError, ValueError) as e:
            data = tm.task_index[name].cfg.get("dataset_path", "its data set")
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise InputError(f"task {name}: data set {data} could not be loaded ({first}); "
                             "connect to the Hugging Face hub once to cache it, or define the task on local files "
                             "with --include-path") from None
        _refuse_generation(loaded["tasks"])
        built += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return built


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's warnings about task YAMLs (default aggregations, ...) would bury a refusal's one line."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _refuse_generation(tasks: dict[str, Task]) -> None:
    from wanda_stream.eval.lm_eval_backend import refusal_of_generation

    generative = sorted(n for n, t in tasks.items() if t.OUTPUT_TYPE == "generate_until")
    if generative:
        raise InputError(refusal_of_generation(generative))


def check_suite_args(num_fewshot: int | None, limit: float | None) -> None:
    """InputError naming the flag for a negative few-shot count or a non-positive limit."""
    if num_fewshot is not None and num_fewshot < 0:
        raise InputError(f"--num-fewshot {num_fewshot}: must be 0 or more")
    if limit is not None and limit <= 0:
        raise InputError(f"--limit {limit}: must be positive (a count, or a fraction below 1)")


def run_suite(lm: LM, tasks: list[str], include_path: Path | None, num_fewshot: int | None, limit: float | None,
              log_samples: bool = False) -> dict:
    """lm-eval's results object (made plain JSON) of `tasks` on the model `lm`."""
    import json

    import lm_eval
    from lm_eval.utils import handle_non_serializable

    tm = task_manager(tasks, include_path)
    loaded = load_tasks(tm, tasks)
    results = lm_eval.simple_evaluate(model=lm, tasks=loaded, task_manager=tm, num_fewshot=num_fewshot,
                                      limit=limit, log_samples=log_samples)
    # One round trip makes every value plain JSON (numpy numbers, dtypes, functions in configs).
    return json.loads(json.dumps(results, default=handle_non_serializable))


def evaluate_tasks(run: TaskRun, stop: StopFlag | None = None) -> dict:
    """lm-eval's results object (JSON-ready) for `run`; the model is streamed one block at a time.

    Tasks and data sets are loaded before any block runs, so their refusals cost no pass over the weights.
    """
    require_lm_eval()
    from wanda_stream.eval.lm_eval_backend import WandaStreamLM

    check_suite_args(run.num_fewshot, run.limit)
    lm = WandaStreamLM(str(run.model_dir), device=run.device, dtype=run.compute_dtype, batch_size=run.batch_size,
                       work_dir=str(run.work_dir) if run.work_dir else None, progress=run.progress, stop=stop)
    return run_suite(lm, run.tasks, run.include_path, run.num_fewshot, run.limit, run.log_samples)


def results_table(results: dict) -> str:
    """lm-eval's own markdown table of the results (and of the groups, when there are any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    return table + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def save_results(results: dict, output_path: Path, model_dir: Path) -> None:
    """Write the results and per-task samples where lm-eval's own --output_path puts them (a folder per model)."""
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    tracker = EvaluationTracker(output_path=str(output_path))
    tracker.general_config_tracker.model_name = str(model_dir)
    tracker.general_config_tracker.model_name_sanitized = sanitize_model_name(str(model_dir))
    samples = results.pop("samples", {})
    tracker.save_results_aggregated(results=results, samples=samples)
    for task, task_samples in samples.items():
        tracker.save_results_samples(task_name=task, samples=task_samples)
