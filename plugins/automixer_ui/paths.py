"""Which files the app may serve, and how.

The rule: a request names a path relative to the runs root; it is served only if the path,
with every symlink and `..` resolved, lies inside the resolved root, and is a regular file.
An absolute path, `..` (also percent-encoded: the server decodes it before we see it), a
symlink inside the root that points out, or a run directory that is itself a symlink out
of the root all resolve outside and are refused. Names starting with `.` (a step's
`.staging-*` directory, dotfiles) are refused too: they are not a run's outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

RUNS_ROOT_ENV = "AUTOMIXER_RUNS_ROOT"
# plugins/automixer_ui/paths.py -> the repository's runs/ (the demo's run.root).
DEFAULT_RUNS_ROOT = Path(__file__).resolve().parents[2] / "runs"

# Shown in the browser (html, images, text); anything else is a download.
INLINE_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".json": "application/json",
    ".md": "text/plain; charset=utf-8",  # Markdown source, read as text
    ".txt": "text/plain; charset=utf-8",
    ".jsonl": "text/plain; charset=utf-8",
    ".yaml": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
    ".out": "text/plain; charset=utf-8",
}
DOWNLOAD_TYPE = "application/octet-stream"  # parquet, duckdb, checkpoints, anything unknown (svg: may hold script)


class Refused(Exception):
    """A path the app does not serve: `status` is the HTTP status, the message says why in one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def runs_root() -> Path:
    """The resolved runs root: $AUTOMIXER_RUNS_ROOT, else the repository's runs/."""
    return Path(os.environ.get(RUNS_ROOT_ENV) or DEFAULT_RUNS_ROOT).expanduser().resolve()


def inside(root: Path, path: Path) -> bool:
    """Whether `path` (resolved) is `root` (resolved) or below it."""
    return path == root or path.is_relative_to(root)


def resolve_in_root(root: Path, relative: str) -> Path:
    """The resolved path `relative` names under `root`, or Refused (403) when it is not inside the root.

    The check comes before any existence test, so a refusal says nothing about what exists outside."""
    if "\x00" in relative or "\\" in relative:
        raise Refused(403, "refused: the path holds a NUL or a backslash")
    if relative.startswith("/") or Path(relative).is_absolute():
        raise Refused(403, "refused: an absolute path; paths are relative to the runs root")
    parts = [p for p in relative.split("/") if p]
    if any(p.startswith(".") for p in parts):  # `..`, `.staging-*`, dotfiles
        raise Refused(403, "refused: a path component starts with '.'")
    resolved = root.joinpath(*parts).resolve()
    if not inside(root, resolved):
        raise Refused(403, "refused: the path resolves outside the runs root")
    return resolved


def servable_file(root: Path, relative: str) -> Path:
    """The regular file `relative` names inside the root (resolve_in_root), else Refused (403/404)."""
    path = resolve_in_root(root, relative)
    if not path.is_file():
        raise Refused(404, f"not found: {relative}")
    return path


def media_type(path: Path) -> tuple[str, bool]:
    """(Content-Type, whether it is served as an attachment)."""
    kind = INLINE_TYPES.get(path.suffix.lower())
    return (kind, False) if kind else (DOWNLOAD_TYPE, True)
