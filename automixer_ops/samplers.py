"""`selection.json`: each task's best checkpoint and the samplers (DESIGN §2, §3).

The one type for a sampler and the one reader of the file. `automixer select` writes it;
score, regroup, report and the DAG read it through `read_selection`, which checks what
they rely on (unique steps, α ≥ 0 summing to 1, every task in one sampler) and names the
file and field when it does not hold: a hand-edited or truncated file fails here, in one
line, not as a KeyError three steps later.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields

from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import RunDir, file_hash

# select.metric 'auto'. A likelihood-only custom task reports bits_per_byte always and perplexity where it is finite.
METRIC_PREFERENCE = ("acc_norm", "acc", "bits_per_byte", "perplexity")
LOWER_IS_BETTER = {"bits_per_byte", "perplexity"}
ALPHA_TOLERANCE = 1e-9
SELECT_METRICS = ("auto", "acc", "acc_norm", "gold_ll")  # the values of select.metric


def headline_metric(metrics) -> str | None:
    """The metric a task is reported by: the first of METRIC_PREFERENCE among `metrics` (None: none of them)."""
    return next((m for m in METRIC_PREFERENCE if m in metrics), None)


def metric_preference(metric: str = "auto") -> tuple[str, ...]:
    """The metrics select tries for a task, in order, under the select.metric setting: 'auto' is
    METRIC_PREFERENCE; 'acc' or 'acc_norm' come first and fall back to it (boolq and winogrande report no
    acc_norm, likelihood-only tasks no accuracy); 'gold_ll' is the only one (every evaluated task has it)."""
    if metric not in SELECT_METRICS:
        raise AutomixerError(f"select.metric: {metric!r} is not one of {', '.join(SELECT_METRICS)}")
    if metric == "auto":
        return METRIC_PREFERENCE
    if metric == "gold_ll":
        return ("gold_ll",)
    return (metric,) + tuple(m for m in METRIC_PREFERENCE if m != metric)


@dataclass
class TaskChoice:
    task: str
    metric: str
    best_step: int
    best_value: float
    last_step: int
    last_value: float
    progression: float  # best_step / last_step
    # Defaults: a selection.json written before these fields still reads.
    best_stderr: float | None = None  # None where lm-eval gives none
    last_stderr: float | None = None
    # |best - last| > noise_z * sqrt(best_stderr^2 + last_stderr^2); None when best is the last step or a stderr
    # is missing.
    separated: bool | None = None


@dataclass
class Sampler:
    step: int
    tasks: list[str]
    alpha: float
    checkpoint: str = ""  # where select found it (informational: readers use RunDir.checkpoint(step))


@dataclass
class Selection:
    tasks: dict[str, TaskChoice]
    samplers: list[Sampler]
    metric: str = "auto"  # the select.metric setting it was made with
    noise_z: float = 1.0  # the select.noise_z setting ("within noise" in Table 1)

    def to_json(self) -> str:
        return json.dumps({"metric": self.metric, "metric_preference": list(metric_preference(self.metric)),
                           "noise_z": self.noise_z,
                           "tasks": {k: asdict(v) for k, v in self.tasks.items()},
                           "samplers": [asdict(s) for s in self.samplers]}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "selection.json") -> "Selection":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AutomixerError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}); "
                                 "rerun `automixer select`") from None
        if not isinstance(data, dict):
            raise AutomixerError(f"{where}: expected a JSON object with 'tasks' and 'samplers'")
        tasks = {name: _record(TaskChoice, v, f"{where}: tasks.{name}")
                 for name, v in _field(data, "tasks", dict, where).items()}
        samplers = [_record(Sampler, s, f"{where}: samplers[{i}]")
                    for i, s in enumerate(_field(data, "samplers", list, where))]
        metric, noise_z = data.get("metric", "auto"), data.get("noise_z", 1.0)  # absent from older files
        if not isinstance(metric, str):
            raise AutomixerError(f"{where}: metric: expected a string, got {type(metric).__name__}")
        if isinstance(noise_z, bool) or not isinstance(noise_z, (int, float)):
            raise AutomixerError(f"{where}: noise_z: expected a number, got {type(noise_z).__name__}")
        selection = cls(tasks, samplers, metric, float(noise_z))
        selection.check(where)
        return selection

    def check(self, where: str = "selection.json") -> None:
        """What every reader relies on; a violation names the file and the field."""
        if not self.samplers:
            raise AutomixerError(f"{where}: samplers: empty; rerun `automixer select`")
        steps = [s.step for s in self.samplers]
        for i, s in enumerate(self.samplers):
            if not isinstance(s.step, int) or isinstance(s.step, bool) or s.step < 0:
                raise AutomixerError(f"{where}: samplers[{i}].step: expected an integer >= 0, got {s.step!r}")
            if not isinstance(s.tasks, list) or not all(isinstance(t, str) for t in s.tasks):
                raise AutomixerError(f"{where}: samplers[{i}].tasks: expected a list of task names")
            if not isinstance(s.alpha, (int, float)) or isinstance(s.alpha, bool) or not math.isfinite(s.alpha) \
                    or s.alpha < 0:
                raise AutomixerError(f"{where}: samplers[{i}].alpha: expected a finite number >= 0, got {s.alpha!r}")
        if len(set(steps)) != len(steps):
            raise AutomixerError(f"{where}: samplers: step listed twice ({sorted(steps)})")
        total = math.fsum(s.alpha for s in self.samplers)
        if abs(total - 1) > ALPHA_TOLERANCE:
            raise AutomixerError(f"{where}: samplers: alpha must sum to 1, got {total!r} "
                                 f"({', '.join(f'step {s.step}: {s.alpha!r}' for s in self.samplers)})")

    def sampler(self, step: int) -> Sampler:
        for s in self.samplers:
            if s.step == step:
                return s
        raise AutomixerError(f"--step {step}: not a sampler of this run "
                             f"(samplers: {', '.join(str(s.step) for s in self.samplers)})")


def _field(data: dict, name: str, kind: type, where: str):
    if name not in data:
        raise AutomixerError(f"{where}: missing field {name!r}; rerun `automixer select`")
    if not isinstance(data[name], kind):
        raise AutomixerError(f"{where}: {name}: expected a JSON {kind.__name__}, got {type(data[name]).__name__}")
    return data[name]


def _record(cls, value, where: str):
    """One dataclass from a JSON object, with its missing or unknown fields named."""
    if not isinstance(value, dict):
        raise AutomixerError(f"{where}: expected an object, got {type(value).__name__}")
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - value.keys())
    unknown = sorted(value.keys() - names)
    if missing or unknown:
        what = "; ".join(x for x in (missing and f"missing {', '.join(missing)}",
                                     unknown and f"unknown {', '.join(unknown)}") if x)
        raise AutomixerError(f"{where}: {what}")
    return cls(**value)


def read_selection(run: RunDir) -> Selection:
    """The run's selection.json, checked; a missing file says which step makes it."""
    path = run.selection
    if not path.is_file():
        raise AutomixerError(f"{path}: not found; run `automixer select` first")
    return Selection.from_json(path.read_text(encoding="utf-8"), where=str(path))


def selection_fingerprint(run: RunDir) -> str:
    """What a table built from the selection records of it: the file's bytes."""
    return file_hash(run.selection)


def format_table1(selection: Selection) -> str:
    """The paper's Table 1 analogue, with each value's stderr and whether the best step is separated from the
    last one by more than the noise, plus the samplers."""
    w = max([len("task"), *(len(t) for t in selection.tasks)])
    mw = max([len("metric"), *(len(c.metric) for c in selection.tasks.values())])
    cells = {t: (_value(c.best_value, c.best_stderr), _value(c.last_value, c.last_stderr))
             for t, c in selection.tasks.items()}
    vw = max([len("best value"), *(len(v) for pair in cells.values() for v in pair)])
    lines = [f"{'task':<{w}}  {'metric':<{mw}}  {'best step':>9}  {'best value':>{vw}}  {'last step':>9}  "
             f"{'last value':>{vw}}  {'steps best/last':>15}  best vs last"]
    for t, c in selection.tasks.items():
        flag = {True: "separated", False: "within noise", None: "-"}[c.separated]
        lines.append(f"{t:<{w}}  {c.metric:<{mw}}  {c.best_step:>9}  {cells[t][0]:>{vw}}  {c.last_step:>9}  "
                     f"{cells[t][1]:>{vw}}  {c.progression:>15.2f}  {flag}")
    lines.append(f"best vs last: 'within noise' when |best - last| <= {selection.noise_z:g} x sqrt(se_best^2 + "
                 "se_last^2) (select.noise_z), 'separated' when more; '-': the best is the last step, or no stderr.")
    lines.append("")
    lines.append(f"{len(selection.samplers)} sampler(s) for {len(selection.tasks)} task(s):")
    for s in selection.samplers:
        lines.append(f"  step {s.step:>6}  alpha {s.alpha:.4f}  tasks: {', '.join(s.tasks)}")
    return "\n".join(lines)


def _value(value: float, stderr: float | None) -> str:
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"
