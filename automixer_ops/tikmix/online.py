"""TiKMiX online: each new checkpoint of your own training run -> the next stage's mixture weights, versioned.

    publish_new_checkpoints(cfg, watch, out, variant, log) -> the versions this scan published

`cfg` is a prepared AutoMixer run (its corpus/ gives the groups and their tokens, its valsets/ the
target tasks' validation sets); `watch` is the directory your trainer saves checkpoints into. A scan
lists the complete checkpoints of `watch` (`find_checkpoints`: the rules are in docs/tikmix.md,
"Online mode") in step order and, for each one not yet published, measures its Group Influence
(cfg.tikmix.estimate, seed cfg.run.seed; cached in out/gi/<name>-<identity>/), solves TiKMiX-D (or -M)
with w_prev = the latest published weights (the first time: the corpus' natural token shares) and the
caps of cfg.tikmix.stage_tokens (null: mix.token_budget), and publishes version N+1:

    out/versions/v<NNNN>/   weights.json (group -> weight, with provenance), blend.txt (Megatron-LM
                            --data-path), domain_weights.json (Olmix's proposed-mixture file), solve.json
    out/tikmix.duckdb       tables group_influence, tikmix_weights (version online-v<NNNN>), published
    out/latest -> versions/v<NNNN>, and out/weights.json (a copy of the latest weights.json)

A checkpoint is known by its identity (checkpoints.checkpoint_identity: resolved path, files' sizes and
times): one already published publishes nothing; one rewritten under the same name is a new version.
One scan at a time (an flock on out/.lock; a second exits 75, retried by the DAG); a version directory
is staged and renamed into place, and the `published` row, written after it, is what makes it count.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.rundir import (RunDir, atomic_write_text, clean_stale_staging, file_lock, publish,
                                  replace_link, staged_directory)

VERSIONS, LATEST, LOCK, LAST_SCAN = "versions", "latest", ".lock", "last_scan.json"
WEIGHTS_JSON, BLEND_TXT, DOMAIN_WEIGHTS_JSON, SOLVE_JSON = ("weights.json", "blend.txt", "domain_weights.json",
                                                            "solve.json")
# A checkpoint directory must have been quiet this long: trainers that write in place (HF Trainer writes the
# model, then the tokenizer, then optimizer.pt...) would otherwise be measured between two files.
SETTLE_SECONDS = 60.0
# Names a trainer gives a directory or file it is still writing.
TEMPORARY_SUFFIXES = (".tmp", ".temp", ".partial", ".incomplete", ".lock")
# An empty file a trainer may put in the checkpoint directory while it writes it (and delete when done).
IN_PROGRESS_MARKERS = (".incomplete", "INCOMPLETE", "_INCOMPLETE")
STEP_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last run of digits: step-300, checkpoint-300, iter_0000300


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # as found in the watched directory (may be a symlink)
    name: str
    step: int


# ---------------------------------------------------------------- which checkpoints are ready

def step_of(name: str) -> int | None:
    m = STEP_NUMBER.search(name)
    return int(m.group(1)) if m else None


def not_ready(path: Path, settle_seconds: float, now: float) -> str | None:
    """Why `path` is not (yet) a complete checkpoint to measure; None when it is."""
    from automixer_ops.checkpoints import check_checkpoint_dir

    name = path.name
    if name.startswith((".", "_", "~")) or name.lower().endswith(TEMPORARY_SUFFIXES):
        return "a hidden or temporary name"
    if step_of(name) is None:
        return "no step number in its name"
    entries = list(path.iterdir())
    marker = next((e.name for e in entries if e.name in IN_PROGRESS_MARKERS), None)
    if marker:
        return f"marker {marker}: still being written"
    temporary = next((e.name for e in entries if e.name.lower().endswith(TEMPORARY_SUFFIXES)), None)
    if temporary:
        return f"{temporary} is still being written"
    if not (path / "config.json").is_file():
        return "no config.json yet"
    try:
        check_checkpoint_dir(path, str(path))  # weight files present and whole (sizes match their headers)
    except ConfigError as e:
        return str(e).removeprefix(f"{path}: ")
    newest = max([path.stat().st_mtime] + [e.stat().st_mtime for e in entries])
    if now - newest < settle_seconds:
        return f"written {now - newest:.0f} s ago (waiting until it has been quiet {settle_seconds:g} s)"
    return None


def find_checkpoints(watch: Path, settle_seconds: float = SETTLE_SECONDS,
                     log: Callable[[str], None] = print) -> list[Checkpoint]:
    """The complete checkpoint directories of `watch`, in step order; what is skipped is logged with why."""
    if not watch.is_dir():
        raise AutomixerError(f"--watch {watch}: not a directory")
    now, found = time.time(), {}
    for path in sorted(watch.iterdir()):
        if not path.is_dir():
            continue  # a log file, a run's metadata: not a checkpoint
        if path.is_symlink() and path.resolve().parent == watch.resolve():
            continue  # a trainer's `last` link to a checkpoint listed under its own name
        try:
            why = not_ready(path, settle_seconds, now)
        except FileNotFoundError:  # removed while we looked (a trainer keeping only its last N checkpoints)
            why = "removed during the scan"
        if why:
            log(f"tikmix-online: skipping {path}: {why}")
            continue
        step = step_of(path.name)
        if step in found:
            raise AutomixerError(f"{watch}: two checkpoints of step {step}, {found[step].name} and {path.name}; "
                                 "keep one of them in the watched directory")
        found[step] = Checkpoint(path, path.name, step)
    return [found[s] for s in sorted(found)]


# ---------------------------------------------------------------- the published history

def read_published(db: Path) -> list[dict]:
    """The `published` table in version order ([] before the first version)."""
    import duckdb

    if not db.is_file():
        return []
    with duckdb.connect(str(db), read_only=True) as con:
        if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'published'").fetchone()[0]:
            return []
        cur = con.execute("SELECT * FROM published ORDER BY version")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]


def record_published(db: Path, row: dict) -> None:
    """One version's row in `published`: written last, it is what makes the version count."""
    import duckdb

    with duckdb.connect(str(db)) as con:
        con.execute("""CREATE TABLE IF NOT EXISTS published (
                           version INTEGER PRIMARY KEY, name VARCHAR, checkpoint VARCHAR, resolved VARCHAR,
                           identity VARCHAR, step BIGINT, variant VARCHAR, previous_version INTEGER,
                           gi_fingerprint VARCHAR, published_at TIMESTAMP, files VARCHAR[])""")
        con.execute("BEGIN")
        con.execute("DELETE FROM published WHERE version = $version", {"version": row["version"]})
        con.execute("""INSERT INTO published VALUES ($version, $name, $checkpoint, $resolved, $identity, $step,
                       $variant, $previous_version, $gi_fingerprint, $published_at, $files)""", row)
        con.execute("COMMIT")


def version_name(version: int) -> str:
    return f"v{version:04d}"


# ---------------------------------------------------------------- the scan

def publish_new_checkpoints(cfg: Config, watch: Path, out: Path, variant: Literal["d", "m"] = "d",
                            log: Callable[[str], None] = print,
                            settle_seconds: float = SETTLE_SECONDS) -> list[dict]:
    """Publish one weights version per new complete checkpoint of `watch` (module docstring); returns the
    `published` rows of this scan ([]: nothing new)."""
    from automixer_ops.checkpoints import checkpoint_identity
    from automixer_ops.tikmix.method import DB_NAME, VARIANTS

    if variant not in VARIANTS:
        raise ConfigError(f"--variant: 'd' or 'm', got {variant!r}")
    watch, out = Path(watch).resolve(), Path(out).resolve()
    if out == watch or watch in out.parents:
        raise AutomixerError(f"--out {out}: must not be inside the watched directory {watch}")
    run = RunDir(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / LOCK, shared=False, busy=f"{out / LOCK}: another tikmix-online scan is publishing "
                                                      "into this directory"):
        clean_stale_staging(out / VERSIONS)  # a version a killed scan left half-staged
        history = read_published(out / DB_NAME)
        known = {r["identity"] for r in history}
        published = []
        for ckpt in find_checkpoints(watch, settle_seconds, log):
            identity = checkpoint_identity(ckpt.path)
            if identity in known:
                continue
            if history and ckpt.step < history[-1]["step"]:
                log(f"tikmix-online: skipping {ckpt.path}: step {ckpt.step} is before the latest published "
                    f"checkpoint's ({history[-1]['step']}, {history[-1]['name']})")
                continue
            row = publish_version(cfg, run, ckpt, identity, history[-1] if history else None, variant, out, log)
            history.append(row)
            known.add(identity)
            published.append(row)
        point_latest(out, history[-1]["name"] if history else None)
        scan = {"scanned_at": _now().isoformat(timespec="seconds") + "Z", "watch": str(watch),
                "published": [_brief(r) for r in published], "latest": _brief(history[-1]) if history else None}
        atomic_write_text(out / LAST_SCAN, json.dumps(scan, indent=2) + "\n")
    return published


def publish_version(cfg: Config, run: RunDir, ckpt: Checkpoint, identity: str, previous: dict | None,
                    variant: str, out: Path, log: Callable[[str], None]) -> dict:
    """Group Influence at `ckpt`, the solve from the previous version, and version N+1 written and recorded."""
    from automixer_ops import __version__
    from automixer_ops.tikmix.group_influence import group_influence, read_gi_json, record
    from automixer_ops.tikmix.method import DB_NAME, gi_settings, read_gi_matrix, record_weights, solve

    version = previous["version"] + 1 if previous else 1
    name = version_name(version)
    tasks = list(cfg.tasks.names())
    settings = gi_settings(cfg, seed=cfg.run.seed)
    label = f"{ckpt.name}-{identity}"  # unique per identity: a rewritten checkpoint keeps its own rows and cache
    gi_dir = out / "gi" / label
    log(f"tikmix-online: {name} from {ckpt.path} (step {ckpt.step})")
    gi_parquet = group_influence(run, ckpt.path, tasks, settings, gi_dir, log)
    gi_info = read_gi_json(gi_dir)

    groups, tokens = group_tokens(run, cfg.tikmix.group_by)
    natural = tokens / tokens.sum()
    w_prev = natural if previous is None else previous_weights(out, previous["name"], groups, log)
    stage_tokens = cfg.tikmix.stage_tokens or cfg.mix.token_budget
    gi = read_gi_matrix(gi_parquet, tasks, groups)
    solved = solve(variant, cfg, run, ckpt.path, groups, tasks, gi, tokens, stage_tokens, w_prev, cfg.run.seed, log)
    weights = {g: float(solved["weights"][g]) for g in groups}

    published_at = _now()
    files = [f"{VERSIONS}/{name}/{f}" for f in (WEIGHTS_JSON, BLEND_TXT, DOMAIN_WEIGHTS_JSON, SOLVE_JSON)]
    summary = {
        "version": version, "name": name, "weights": weights,
        "provenance": {
            "checkpoint": {"path": str(ckpt.path), "resolved": str(ckpt.path.resolve()), "name": ckpt.name,
                           "step": ckpt.step, "identity": identity},
            "previous_version": previous["name"] if previous else None,
            "w_prev": dict(zip(groups, map(float, w_prev))),
            "w_prev_from": previous["name"] if previous else "the corpus' natural token shares",
            "variant": variant, "stage_tokens": stage_tokens, "tasks": tasks,
            "group_influence": {"path": str(gi_parquet), "fingerprint": gi_info["fingerprint"],
                                "estimate": settings.estimate, "per_group": settings.per_group,
                                "group_by": settings.group_by, "seed": settings.seed},
            "corpus": {"run_dir": str(run.path), "fingerprint": run.corpus_fingerprint(),
                       "tokens": dict(zip(groups, map(int, tokens)))},
            "published_at": published_at.isoformat(timespec="seconds") + "Z", "automixer": __version__},
        "files": {"megatron_blend": BLEND_TXT, "olmix": DOMAIN_WEIGHTS_JSON, "solve": SOLVE_JSON},
    }
    write_version_dir(out, name, summary, solved)
    record(out / DB_NAME, gi_dir, label, ckpt.step)
    record_weights(out / DB_NAME, [
        {"version": f"online-{name}", "stage": version, "checkpoint": label, "variant": variant, "group_name": g,
         "weight": weights[g], "w_prev": float(p), "cap": (solved.get("caps") or {}).get(g),
         "gi_hat": (solved.get("g_hat") or {}).get(g), "tokens_available": int(t)}
        for g, p, t in zip(groups, w_prev, tokens)])
    row = {"version": version, "name": name, "checkpoint": str(ckpt.path), "resolved": str(ckpt.path.resolve()),
           "identity": identity, "step": ckpt.step, "variant": variant,
           "previous_version": previous["version"] if previous else None, "gi_fingerprint": gi_info["fingerprint"],
           "published_at": published_at, "files": files}
    record_published(out / DB_NAME, row)
    log(f"tikmix-online: published {name}: " + ", ".join(f"{g} {w:.4f}" for g, w in weights.items()))
    return row


def group_tokens(run: RunDir, group_by: str) -> tuple[list[str], np.ndarray]:
    """Every group of the corpus (by name) and its tokens."""
    import duckdb

    from automixer_ops.sqlrun import literal_paths

    shards = run.corpus_files()
    con = duckdb.connect()
    cols = {r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet($p)", {"p": literal_paths(shards)})
            .fetchall()}
    if group_by not in cols:
        raise ConfigError(f"tikmix.group_by: the corpus ({run.corpus}) has no column {group_by!r}")
    rows = con.execute(f"""SELECT CAST("{group_by}" AS VARCHAR) AS g, sum(n_tokens) FROM read_parquet($p)
                           GROUP BY g ORDER BY g""", {"p": literal_paths(shards)}).fetchall()
    if any(g is None for g, _ in rows):
        raise AutomixerError(f"tikmix.group_by: column {group_by!r} of {run.corpus} has NULL values")
    tokens = np.array([int(t) for _, t in rows], dtype=np.int64)
    if tokens.sum() <= 0:
        raise AutomixerError(f"{run.corpus}: the corpus has no tokens")
    return [g for g, _ in rows], tokens


def previous_weights(out: Path, name: str, groups: list[str], log: Callable[[str], None]) -> np.ndarray:
    """The published weights of version `name` over `groups` (a group the corpus no longer has is dropped and the
    rest renormalised; a new group starts at 0)."""
    path = out / VERSIONS / name / WEIGHTS_JSON
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))["weights"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise AutomixerError(f"{path}: cannot read the previous version's weights ({e})") from None
    w = np.array([float(prev.get(g, 0.0)) for g in groups])
    if set(prev) != set(groups):
        log(f"tikmix-online: the corpus groups changed since {name}: previous weights renormalised over today's")
    if w.sum() <= 0:
        raise AutomixerError(f"{path}: no weight on any group of today's corpus")
    return w / w.sum()


# ---------------------------------------------------------------- the files

def write_version_dir(out: Path, name: str, summary: dict, solved: dict) -> Path:
    """out/versions/<name>/ with its four files, renamed into place whole."""
    final = out / VERSIONS / name
    with staged_directory(out / VERSIONS) as stage:
        target = stage / name
        target.mkdir()
        atomic_write_text(target / WEIGHTS_JSON, json.dumps(summary, indent=2) + "\n")
        atomic_write_text(target / BLEND_TXT, megatron_blend(summary["weights"]) + "\n")
        atomic_write_text(target / DOMAIN_WEIGHTS_JSON, json.dumps(olmix_weights(summary["weights"])) + "\n")
        atomic_write_text(target / SOLVE_JSON, json.dumps(solved, indent=2, default=float) + "\n")
        publish(target, final)
    return final


def megatron_blend(weights: dict[str, float]) -> str:
    """Megatron-LM's --data-path "w1 prefix1 w2 prefix2 ...", one `<group>_text_document` prefix per group (as
    tools/preprocess_data.py --output-prefix <group> names it), as `automixer mix` writes blend.txt; groups whose
    weight rounds to 0 are left out (Megatron normalises the weights it is given)."""
    return " ".join(f"{w:.6f} {g}_text_document" for g, w in weights.items() if round(w, 6) > 0)


def olmix_weights(weights: dict[str, float]) -> list[dict]:
    """Olmix's proposed-mixture file (`olmix fit` writes `*_optimal.json`): [{"domain": ..., "weight": ...}]."""
    return [{"domain": g, "weight": w} for g, w in weights.items()]


def point_latest(out: Path, name: str | None) -> None:
    """out/latest -> versions/<name> and out/weights.json its copy (also repairs a scan killed between the
    `published` row and these two)."""
    if name is None:
        return
    target = Path(VERSIONS) / name  # relative: the output directory can be moved or mounted elsewhere
    replace_link(out / LATEST, target)
    text = (out / target / WEIGHTS_JSON).read_text(encoding="utf-8")
    copy = out / WEIGHTS_JSON
    if not copy.is_file() or copy.read_text(encoding="utf-8") != text:
        atomic_write_text(copy, text)


def _brief(row: dict) -> dict:
    return {"version": row["name"], "checkpoint": row["checkpoint"], "step": row["step"],
            "path": f"{VERSIONS}/{row['name']}"}


def _now() -> datetime:
    """UTC, naive (DuckDB's TIMESTAMP column; the JSON files add the Z)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)
