"""The run directory: where every step's outputs live, and how they are written.

Layout (DESIGN §3): config.yaml, corpus/, tokenizer/, checkpoints/, eval/, scores/, ...
Each step writes into a hidden staging directory next to its target and renames it into
place only when complete, so an output that exists is whole: a crash leaves at most a
`.staging-*` directory, which the next run of the step removes. A step's completion
marker (`_SUCCESS.json`) is written inside its output before the rename and records what
the output was built from, so a rerun can tell "done" from "done with other inputs".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

SUCCESS = "_SUCCESS.json"
STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class RunDir:
    """Every path of DESIGN §3's run-directory contract, named once."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def corpus(self) -> Path:
        return self.path / "corpus"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def proxy(self) -> Path:
        """The proxy run's own files: token stream and training log."""
        return self.path / "proxy"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    @property
    def benchmark(self) -> Path:
        return self.eval / "benchmark.parquet"

    @property
    def heatmap(self) -> Path:
        return self.eval / "benchmark_heatmap.png"

    @property
    def valsets(self) -> Path:
        return self.path / "valsets"

    def valset(self, task: str) -> Path:
        return self.valsets / f"{task}.jsonl"

    @property
    def selection(self) -> Path:
        return self.path / "selection.json"

    @property
    def scores(self) -> Path:
        return self.path / "scores"

    def sampler_scores(self, step: int) -> Path:
        return self.scores / f"step={step}"

    @property
    def db(self) -> Path:
        return self.path / "automixer.duckdb"

    @property
    def mixture(self) -> Path:
        return self.path / "mixture"

    @property
    def report(self) -> Path:
        return self.path / "report"

    def corpus_shards(self) -> list[Path]:
        return sorted(self.corpus.glob("part-*.parquet"))

    def score_parts(self, steps: list[int]) -> list[Path]:
        """The score files of the given samplers, sampler by sampler, each's parts in name order."""
        return [p for step in steps for p in sorted(self.sampler_scores(step).glob("part-*.parquet"))]

    def corpus_fingerprint(self) -> str:
        """Which corpus a table was built from: prepare's input fingerprint and the shards' sizes and times."""
        marker = read_marker(self.corpus) or {}
        return fingerprint({"prepared": marker.get("fingerprint"), "shards": files_identity(self.corpus_shards())})

    def scores_fingerprint(self, steps: list[int]) -> str:
        """Which score files a table was built from: their paths in the run, sizes and times."""
        return fingerprint(files_identity(self.score_parts(steps), self.path))

    def corpus_files(self) -> list[str]:
        """The corpus shards as a list of paths for DuckDB's read_parquet: a literal list, never a glob,
        so a run path holding glob characters ('[1]') reads what it names."""
        shards = self.corpus_shards()
        if not shards:
            from automixer_ops.errors import AutomixerError

            raise AutomixerError(f"{self.corpus}: no part-*.parquet shards; run `automixer prepare` first")
        return [str(p) for p in shards]


def files_identity(files: list[Path], root: Path | None = None) -> list:
    """(name, size, mtime) of each file: what tells a rewritten file from the one a table was built from."""
    return [(str(p.relative_to(root)) if root else p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def fingerprint(payload) -> str:
    """The short content hash every step records of its inputs (sha256 of the canonical JSON, 16 hex)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    """The sha256 of a file's bytes (16 hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file beside `path`, flushed to disk, then renamed into place: readers see the
    old file or the new one, never a mix. Each call has its own temporary name, so two writers of one file
    (a retried task beside a job still running) never write into the same file, and a failed write leaves
    none behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def parquet_metadata(path: Path) -> dict[str, str]:
    """The key-value metadata of a Parquet file's schema (where steps record what made the file)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def fsync_file(path: Path) -> None:
    """Flush a finished file to disk before it is renamed into place (and a marker names it)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_marker(directory: Path, info: dict) -> None:
    atomic_write_text(directory / SUCCESS, json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_marker(directory: Path) -> dict | None:
    """A step's completion marker; None when there is none. A damaged one (a write cut short, an edit) fails
    with one line naming the file, not a traceback."""
    from automixer_ops.errors import AutomixerError

    path = directory / SUCCESS
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AutomixerError(f"{path}: unreadable completion marker ({e}); rerun the step that wrote it") from None
    if not isinstance(info, dict):
        raise AutomixerError(f"{path}: expected a JSON object; rerun the step that wrote it")
    return info


def clean_stale_staging(parent: Path) -> None:
    """Remove staging directories left by a killed run of a step."""
    if parent.is_dir():
        for p in parent.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def staged_directory(parent: Path) -> Iterator[Path]:
    """A fresh staging directory under `parent`, removed if the block fails.

    The caller fills it and moves its children into place with `publish`. `parent` is
    created for the staging only if needed, and removed again on failure if it was created
    here (or left empty), so a failed first step leaves no run directory behind.
    """
    created = not parent.exists()
    stage = parent / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created or not any(parent.iterdir()):
            shutil.rmtree(parent, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """Move a complete staged file or directory to `final`, replacing what was there."""
    if final.exists():
        trash = final.with_name(f"{STAGING_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)


# ---------------------------------------------------------------- run marker, strict markers, locks

RUN_MARKER = "_AUTOMIXER_RUN.json"


def replace_link(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` in one rename (a staged link, so a crash leaves at most a `.staging-*`
    entry that clean_stale_staging removes); a link already pointing there is left alone."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    tmp = link.parent / f"{STAGING_PREFIX}link-{link.name}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=target.is_dir())
    os.replace(tmp, link)


def is_run_directory(path: Path) -> bool:
    """A directory AutoMixer made: it holds the run marker (written by prepare), or a prepared corpus (runs
    prepared before the marker existed)."""
    return (path / RUN_MARKER).is_file() or (path / "corpus" / SUCCESS).is_file()


def write_run_marker(path: Path, run_id: str) -> None:
    """Mark `path` as a run directory, so that later steps may replace what is in it."""
    if not (path / RUN_MARKER).is_file():
        atomic_write_text(path / RUN_MARKER, json.dumps({"automixer_run": run_id}, indent=2) + "\n")


@contextmanager
def file_lock(path: Path, *, shared: bool, busy: str) -> Iterator[None]:
    """Hold an flock on `path` (created if needed) for the block, without waiting: when another process holds
    it (exclusively, or at all for an exclusive lock), raise TransientError(busy), which the CLI turns into
    exit 75 and the launcher retries."""
    import fcntl

    from automixer_ops.errors import TransientError

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TransientError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
