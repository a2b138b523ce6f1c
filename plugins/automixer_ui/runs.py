"""Run directories: which exist under the runs root, what each holds, and which one a DAG run wrote.

A DAG run's directory is what its tasks compute: the run config its `config` param names,
with the params' overrides (`run.id` may be one), `<run.root>/<run.id>`. The config is read
only when asked for (it is a file on the shared volume, and it may be gone or broken).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from automixer_ui.paths import inside

# The outputs a person looks for, relative to the run directory, in the order the index lists them.
OUTPUTS = {
    "report": "report/index.html",
    "summary": "report/summary.md",
    "duckdb": "automixer.duckdb",
    "weights.json": "mixture/weights.json",
    "blend.txt": "mixture/blend.txt",
    "selection.json": "selection.json",
}


@dataclass(frozen=True)
class RunInfo:
    """One run directory: its path relative to the root and which outputs exist."""

    name: str
    path: Path
    outputs: dict[str, bool]
    mixture_parts: int

    @property
    def report_state(self) -> str:
        if self.outputs["report"]:
            return "index.html"
        return "summary.md only" if self.outputs["summary"] else "none yet"

    @property
    def mixture_state(self) -> str:
        if not self.outputs["weights.json"]:
            return "none yet"
        return f"{self.mixture_parts} part file(s)"


def run_info(root: Path, path: Path) -> RunInfo:
    return RunInfo(name=path.relative_to(root).as_posix(), path=path,
                   outputs={k: (path / rel).is_file() for k, rel in OUTPUTS.items()},
                   mixture_parts=len(list((path / "mixture").glob("part-*.parquet"))))


def list_runs(root: Path) -> list[RunInfo]:
    """The run directories directly under the root, by name: a directory holding a config.yaml (each step
    writes it first) whose resolved path stays inside the root; dot-directories are skipped."""
    if not root.is_dir():
        return []
    runs = []
    for child in sorted(root.iterdir()):
        path = child.resolve()
        if child.name.startswith(".") or not inside(root, path) or path == root:
            continue
        if path.is_dir() and (path / "config.yaml").is_file():
            runs.append(run_info(root, child))
    return runs


class RunDirUnknown(Exception):
    """The DAG run's directory cannot be told: one line saying why (no config param, config unreadable...)."""


def dag_run_dir(conf: Mapping[str, Any] | None) -> Path:
    """The run directory of a DAG run with this conf, as its tasks compute it, or RunDirUnknown."""
    try:
        from automixer_launcher.cli_argv import config_overrides
        from automixer_ops.config import load_config
        from automixer_ops.errors import AutomixerError
    except ImportError as e:  # the API server needs the automixer package (and plugins/ on sys.path)
        raise RunDirUnknown(f"the API server cannot import {e.name}: install automixer where it runs") from None

    from airflow.sdk.exceptions import AirflowException

    conf = dict(conf or {})
    if not conf.get("config"):
        raise RunDirUnknown("the DAG run has no `config` param")
    try:
        return load_config(conf["config"], config_overrides(conf)).run_dir
    except (AutomixerError, AirflowException) as e:
        raise RunDirUnknown(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
