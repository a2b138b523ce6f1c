"""Target tasks for lm-evaluation-harness: lm-eval names, local copies, custom JSONL.

* With `tasks.data_dir`, each lm-eval target is served from `<data_dir>/<task>/<split>.jsonl`
  through a generated YAML that `include:`s lm-eval's own bundled task YAML and swaps only
  the data source, so prompts, targets and metrics are exactly lm-eval's.
* Without it, targets resolve the usual way (lm-eval's task index, data from the hub).
* A custom task is a JSONL file: {context, choices, gold} (multiple choice, accuracy) or
  {context, continuation} (likelihood only: bits per byte of the continuation, and perplexity
  where it is finite; lm-eval's perplexity is exp of a document's summed NLL, which overflows a
  float for continuations of a few hundred characters).

Each task's documents have three disjoint uses (`tasks.docs`): selection (evaluate every
checkpoint, choose the best), validation (the influence target) and test (judge target models
trained on mixtures). `doc_ranges` clips each range to a task's documents and refuses a range
that leaves a task none; `validation_pairs` turns a range of documents into the (context, gold
continuation) pairs lm-eval itself would score; `cross_use_duplicates` finds identical gold pairs
that sit in two uses (benchmarks hold duplicate items).
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from automixer_ops.config import DOC_USES, Config, CustomTask
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.rundir import RunDir, atomic_write_text

# Bundled YAML of each of the paper's tasks, relative to lm_eval/tasks (found by a scan otherwise).
BUNDLED = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "winogrande": "winogrande/default.yaml",
}
SPLITS = ("test", "validation")  # lm-eval evaluates test when a task has one, else validation


@dataclass(frozen=True)
class TaskSetup:
    include_path: Path  # generated YAMLs (local copies, custom tasks)
    names: list[str]
    include_defaults: bool  # True when some targets load the usual way

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=str(self.include_path), include_defaults=self.include_defaults)


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def bundled_yaml(task: str) -> Path:
    root = lm_eval_tasks_dir()
    if task in BUNDLED:
        return root / BUNDLED[task]
    # Any other lm-eval task: find the YAML that defines it (a text scan: no task index).
    for path in sorted(root.rglob("*.yaml")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if f"task: {task}\n" in text:
            return path
    raise ConfigError(f"tasks.targets: {task!r} is not an lm-evaluation-harness task name")


def write_task_yamls(cfg: Config, out: Path, specs: dict | None = None) -> TaskSetup:
    """Generate the YAMLs for local copies and custom tasks into `out` (replacing what was there).

    Each file is replaced atomically and only stale ones are removed, so evaluations of
    several checkpoints running at once (mapped Airflow tasks) never see a missing YAML.
    `specs`: task_specs(cfg), when already made.
    """
    specs = task_specs(cfg) if specs is None else specs
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in specs.items():
        atomic_write_text(out / f"{name}.yaml", yaml.dump(spec, Dumper=_TaskDumper, sort_keys=False))
    for old in out.glob("*.yaml"):
        if old.stem not in specs:
            old.unlink(missing_ok=True)
    return TaskSetup(out, cfg.tasks.names(), include_defaults=cfg.tasks.data_dir is None and bool(cfg.tasks.targets))


def load_checked_tasks(cfg: Config, out: Path, uses: tuple[str, ...] = DOC_USES) -> tuple[TaskSetup, dict, dict]:
    """The task YAMLs in `out`, lm-eval's Task objects and each use's document range per task
    ({use: {task: range}}). The tasks are loaded from YAMLs in a temporary directory and their ranges
    checked (doc_ranges) before anything is written to `out`: a bad range changes no file."""
    specs = task_specs(cfg)
    with tempfile.TemporaryDirectory(prefix="automixer-tasks-") as tmp:
        tasks = load_tasks(write_task_yamls(cfg, Path(tmp), specs))
    ranges = doc_ranges(cfg, tasks, uses)
    return write_task_yamls(cfg, out, specs), tasks, ranges


def doc_ranges(cfg: Config, tasks: dict, uses: tuple[str, ...] = DOC_USES) -> dict[str, dict[str, range]]:
    """{use: {task: the document indices}}: each `tasks.docs` range clipped to the task's documents; a range
    that leaves a task no document is an error naming the task, the range and the task's size."""
    out: dict[str, dict[str, range]] = {use: {} for use in uses}
    for name, task in tasks.items():
        n = len(task.eval_docs)
        for use in uses:
            start, end = getattr(cfg.tasks.docs, use)
            if start >= n:
                raise ConfigError(f"tasks.docs.{use}: [{start}, {end}) leaves task {name!r} with no documents (it "
                                  f"has {n}, indices 0..{n - 1}); give a range that starts below {n}")
            out[use][name] = range(start, min(end, n))
    return out


def task_specs(cfg: Config) -> dict:
    """The generated YAML of each local copy and custom task, by name (every task checked, nothing written)."""
    specs = {}
    data_dir = cfg.resolve(cfg.tasks.data_dir).resolve() if cfg.tasks.data_dir else None
    for task in cfg.tasks.targets:
        if data_dir is None:
            continue
        local = [data_dir / task / f"{split}.jsonl" for split in SPLITS]
        found = [p for p in local if p.is_file()]
        if not found:
            raise ConfigError(f"tasks.data_dir: no local copy of {task!r} (expected {local[0]} or {local[1]}); "
                              "add it, or drop tasks.data_dir to load tasks the usual way")
        split = found[0].stem
        specs[task] = {"include": str(bundled_yaml(task)), "task": task, "dataset_path": "json",
                       "dataset_name": None, "dataset_kwargs": {"data_files": {split: data_file(found[0])}},
                       "training_split": None, "validation_split": split if split == "validation" else None,
                       "test_split": split if split == "test" else None, "fewshot_split": None}
    for task in cfg.tasks.custom:
        specs[task.name] = custom_task_yaml(cfg, task)
    return specs


def custom_task_yaml(cfg: Config, task: CustomTask) -> dict:
    path = cfg.resolve(task.path).resolve()
    kind = check_custom_jsonl(path, f"tasks.custom ({task.name})")
    spec = {"task": task.name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": data_file(path)}}, "test_split": "test",
            "doc_to_text": "{{context}}"}
    if kind == "multiple_choice":
        return {**spec, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
    # Not lm-eval's `perplexity` aggregation: exp(mean summed NLL) overflows, in the value and in its bootstrap
    # stderr (OverflowError), once continuations run to a few hundred characters. bits_per_byte cannot overflow.
    return {**spec, "output_type": "loglikelihood", "doc_to_target": "{{continuation}}",
            "process_results": LmEvalFunction(f"{__name__}.likelihood_results"),
            "metric_list": [{"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
                            {"metric": "perplexity", "aggregation": LmEvalFunction(f"{__name__}.finite_perplexity"),
                             "higher_is_better": False}]}


def likelihood_results(doc: dict, results) -> dict:
    """lm-eval process_results of a likelihood-only custom task: per document (log-likelihood of the
    continuation, its UTF-8 bytes) for bits_per_byte, and the log-likelihood for perplexity."""
    ll, _is_greedy = results[0]
    return {"bits_per_byte": (ll, len(doc["continuation"].encode("utf-8"))), "perplexity": ll}


def finite_perplexity(items: list[float]) -> float:
    """lm-eval's perplexity, exp(-mean log-likelihood), or inf where that overflows a float (evaluate leaves
    non-finite values out of the benchmark table). A function of ours, so lm-eval does not bootstrap a stderr."""
    try:
        return math.exp(-sum(items) / len(items))
    except OverflowError:
        return math.inf


class LmEvalFunction(str):
    """A `!function module.name` reference in a generated lm-eval task YAML."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(LmEvalFunction, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def data_file(path: Path) -> str:
    """A path for `datasets`' data_files, which globs: a run or data path holding '[1]' or '*' is escaped so
    that it names just that file."""
    return glob.escape(str(path)) if glob.has_magic(str(path)) else str(path)


def check_custom_jsonl(path: Path, where: str) -> str:
    """Validate a custom task file; returns 'multiple_choice' or 'loglikelihood'."""
    if not path.is_file():
        raise ConfigError(f"{where}: {path} not found")
    kind = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            loc = f"{path}:{lineno}"
            if not raw.strip():
                raise ConfigError(f"{loc}: blank line; a custom task file holds one JSON object per line, none empty")
            try:
                doc = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{loc}: not valid UTF-8 JSON: {e}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("context"), str):
                raise ConfigError(f"{loc}: each line needs a string field 'context'")
            this = "multiple_choice" if "choices" in doc else "loglikelihood" if "continuation" in doc else None
            if this is None:
                raise ConfigError(f"{loc}: needs 'choices' and 'gold' (multiple choice) or 'continuation'")
            if kind is not None and this != kind:
                raise ConfigError(f"{loc}: mixes multiple-choice and likelihood-only lines")
            kind = this
            if this == "multiple_choice":
                ch, gold = doc["choices"], doc.get("gold")
                if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
                    raise ConfigError(f"{loc}: 'choices' must be a list of at least 2 strings")
                if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(ch):
                    raise ConfigError(f"{loc}: 'gold' must be the index of the right choice (0..{len(ch) - 1})")
            elif not isinstance(doc["continuation"], str) or not doc["continuation"]:
                raise ConfigError(f"{loc}: 'continuation' must be a non-empty string")
    if kind is None:
        raise ConfigError(f"{where}: {path} is empty")
    return kind


def load_tasks(setup: TaskSetup) -> dict:
    """lm-eval Task objects by name (datasets loaded from the configured sources)."""
    try:
        return dict(setup.task_manager().load(setup.names)["tasks"])
    except Exception as e:  # lm-eval raises KeyError/ValueError/... for unknown or broken tasks
        raise ConfigError(f"tasks: lm-eval could not load {setup.names}: {e}") from None


def validation_pairs(task, docs: range) -> list[dict]:
    """The evaluation documents at indices `docs` as lm-eval's own (context, gold continuation) pairs, each with
    its document index ("doc")."""
    name = task.config.task
    if task.OUTPUT_TYPE not in ("multiple_choice", "loglikelihood"):
        raise ConfigError(f"tasks: {name!r} is a {task.OUTPUT_TYPE} task; influence needs a gold continuation "
                          "to score, so targets must be multiple_choice or loglikelihood tasks")
    if not isinstance(docs, range) or docs.step != 1:
        raise TypeError(f"validation_pairs: docs must be a range of document indices, got {docs!r}")
    pairs = []
    for i, doc in itertools.islice(enumerate(task.eval_docs), docs.start, docs.stop):
        ctx = task.fewshot_context(doc, 0, gen_prefix=task.doc_to_prefix(doc))
        requests = task.construct_requests(doc=doc, ctx=ctx, metadata=(task.config.task, i, 1))
        requests = requests if isinstance(requests, list) else [requests]
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            gold = gold[0] if isinstance(gold, list) else gold  # several right answers: the first
            if isinstance(gold, str):
                if gold not in choices:
                    raise ConfigError(f"tasks: {name!r} document {i}: gold answer {gold!r} is not among its choices")
                gold = choices.index(gold)
            context, continuation = requests[gold].arguments
        else:
            context, continuation = requests[0].arguments
        pairs.append({"task": name, "doc": i, "context": context, "continuation": continuation})
    return pairs


def cross_use_duplicates(pairs: dict[str, dict[str, list[dict]]]) -> list[dict]:
    """Identical gold (context, continuation) pairs that sit in more than one use of a task's documents.

    pairs: {use: {task: validation_pairs(...)}}. Returns one record per duplicated pair: {"task": name,
    <use>: [doc indices], ...} for the uses that hold it (two uses or more), in task and document order."""
    found = []
    tasks = sorted({t for by_task in pairs.values() for t in by_task})
    for task in tasks:
        where: dict[tuple[str, str], dict[str, list[int]]] = {}
        for use, by_task in pairs.items():
            for p in by_task.get(task, []):
                where.setdefault((p["context"], p["continuation"]), {}).setdefault(use, []).append(p["doc"])
        for uses in where.values():
            if len(uses) > 1:
                found.append({"task": task, **uses})
    return found


def read_validation_set(run_dir: Path, task: str) -> list[dict]:
    """A task's (context, continuation) pairs as `evaluate` wrote them to <run>/valsets/<task>.jsonl."""
    path = RunDir(run_dir).valset(task)
    if not path.is_file():
        raise AutomixerError(f"{path}: no validation set for {task!r}; run `automixer evaluate` first")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as e:
            raise AutomixerError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        missing = [k for k in ("context", "continuation") if not isinstance(pair, dict) or
                   not isinstance(pair.get(k), str)]
        if missing:
            raise AutomixerError(f"{path}:{n}: needs string fields 'context' and 'continuation' "
                                 f"(missing or not a string: {', '.join(missing)})")
        pairs.append(pair)
    return pairs
