"""The run directory: where every step's outputs live, and how they are written.

Layout (DESIGN §3): config.yaml, corpus/, tokenizer/, checkpoints/, eval/, scores/, ...
Each step writes into a hidden staging directory next to its target and renames it into
place only when complete, so an output that exists is whole: a crash leaves at most a
`.staging-*` directory, which the next run of the step removes. A step's completion
marker (`_SUCCESS.json`) is written inside its output before the rename and records what
the output was built from, so a rerun can tell "done" from "done with other inputs".
"""

from __future__ import annotations

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

    def corpus_shards(self) -> list[Path]:
        return sorted(self.corpus.glob("part-*.parquet"))


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
    try:
        return json.loads((directory / SUCCESS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


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
