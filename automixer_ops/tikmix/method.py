"""A TiKMiX mixture from a run: Group Influence at a checkpoint, TiKMiX-D or -M, a token-budgeted draw.

    tikmix_mixture(cfg, variant, out, token_budget, seed, work, log) -> out      (the mixture/ contract)

1. Group Influence of every group (`tikmix.group_by`) on every target task at the proxy checkpoint
   `tikmix.checkpoint` (default: the last), estimated as `tikmix.estimate` says; kept in
   `work/gi/step=<N>-<estimate>/` and recorded in `work/tikmix.duckdb` (table group_influence);
2. the weights: TiKMiX-D (`solve_d`, the previous mixture being the corpus' natural token shares)
   or TiKMiX-M (probes on `tikmix.m.n_candidates` capped candidates, LightGBM, search: solve_m);
   recorded in the table tikmix_weights and in `work/solve-<variant>-step=<N>.json`;
3. the draw: each group its weight x token_budget tokens, by the baselines' seeded draw (documents
   in a seeded permutation per group, further passes past a group's tokens, the rounding carried
   from group to group), shuffled once, written as mixture/ (parts, weights.json, blend.txt).

The caps of both variants are repetition_factor x a group's tokens / token_budget. A rerun with the
same inputs does nothing (GI, solve and draw are each keyed by what they depend on).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.rundir import RunDir, atomic_write_text, fingerprint

VARIANTS = ("d", "m")
VERSION = 1  # of the draw and the solve's inputs below
DB_NAME = "tikmix.duckdb"


def gi_settings(cfg: Config, seed: int):
    from automixer_ops.tikmix.group_influence import GISettings

    return GISettings(group_by=cfg.tikmix.group_by, estimate=cfg.tikmix.estimate, per_group=cfg.tikmix.per_group,
                      seed=seed, max_seq_len=cfg.influence.max_seq_len, batch_tokens=cfg.influence.batch_tokens,
                      norm_mode=cfg.influence.norm_mode, device=cfg.influence.device)


def checkpoint_step(cfg: Config, run: RunDir) -> tuple[int, Path]:
    from automixer_ops.checkpoints import list_checkpoints

    ckpts = list_checkpoints(run)
    if not ckpts:
        raise AutomixerError(f"{run.checkpoints}: no checkpoints; TiKMiX needs `automixer train-proxy` first")
    step = cfg.tikmix.checkpoint if cfg.tikmix.checkpoint is not None else max(ckpts)
    if step not in ckpts:
        raise ConfigError(f"tikmix.checkpoint: no checkpoint step-{step} in {run.checkpoints} "
                          f"(steps: {', '.join(map(str, ckpts))})")
    return step, ckpts[step]


def read_gi_matrix(gi_parquet: Path, tasks: list[str], groups: list[str]) -> np.ndarray:
    """(tasks, groups) GI from a gi.parquet; a group it does not hold (no document sampled) is NaN."""
    import duckdb

    rows = duckdb.sql("SELECT task, group_name, gi FROM read_parquet($p)", params={"p": str(gi_parquet)}).fetchall()
    gi = np.full((len(tasks), len(groups)), np.nan)
    t_i, g_i = {t: i for i, t in enumerate(tasks)}, {g: i for i, g in enumerate(groups)}
    for t, g, v in rows:
        if t in t_i and g in g_i:
            gi[t_i[t], g_i[g]] = v
    missing = [t for t in tasks if np.isnan(gi[t_i[t]]).all()]
    if missing:
        raise AutomixerError(f"{gi_parquet}: no Group Influence for {', '.join(missing)}")
    return gi


def record_weights(db: Path, rows: list[dict]) -> None:
    """Rows (version, stage, checkpoint, variant, group_name, weight, ...) into tikmix_weights; a version's rows
    are replaced as a whole."""
    import duckdb
    import pyarrow as pa

    from automixer_ops.tikmix.group_influence import db_writer

    table = pa.Table.from_pylist(rows)
    with db_writer(db), duckdb.connect(str(db)) as con:
        con.execute("""CREATE TABLE IF NOT EXISTS tikmix_weights (
                           version VARCHAR, stage INTEGER, checkpoint VARCHAR, variant VARCHAR, group_name VARCHAR,
                           weight DOUBLE, w_prev DOUBLE, cap DOUBLE, gi_hat DOUBLE, tokens_available BIGINT)""")
        con.execute("BEGIN")
        for version in sorted({r["version"] for r in rows}):
            con.execute("DELETE FROM tikmix_weights WHERE version = $v", {"v": version})
        con.register("new_rows", table)
        con.execute("""INSERT INTO tikmix_weights SELECT version, stage, checkpoint, variant, group_name, weight,
                              w_prev, cap, gi_hat, tokens_available FROM new_rows""")
        con.execute("COMMIT")


def solve(variant: Literal["d", "m"], cfg: Config, run: RunDir, checkpoint: Path, groups: list[str],
          tasks: list[str], gi: np.ndarray, tokens: np.ndarray, stage_tokens: int, w_prev: np.ndarray, seed: int,
          log: Callable[[str], None], training=None) -> dict:
    """The stage's weights and how they were reached (a JSON-ready dict with `weights`, `g_hat`, `caps`).
    `training`: the settings of the model at `checkpoint` (TiKMiX-M's probes train like it); default the proxy's."""
    from automixer_ops.tikmix.solve_d import solve_d

    if variant == "d":
        res = solve_d(groups, tasks, gi, tokens, stage_tokens, cfg.tikmix.d, dict(zip(groups, map(float, w_prev))))
        return {"variant": "d", **res.to_dict()}
    return _solve_m(cfg, run, checkpoint, groups, tasks, gi, tokens, stage_tokens, w_prev, seed, log,
                    training or cfg.proxy)


def _solve_m(cfg, run, checkpoint, groups, tasks, gi, tokens, stage_tokens, w_prev, seed, log, p) -> dict:
    import torch  # noqa: F401  (loaded before transformers' tokenizer, as every other step does)
    from transformers import AutoTokenizer

    from automixer_ops.checkpoints import checkpoint_tokenizer_dir, pick_device
    from automixer_ops.tikmix.group_influence import validation_by_task
    from automixer_ops.tikmix.probe import ProbeSettings, group_pools, probe_changes
    from automixer_ops.tikmix.solve_m import candidate_mixtures, fit_regressors, search

    m, d = cfg.tikmix.m, cfg.tikmix.d
    caps = _caps(tokens, stage_tokens, d.repetition_factor)
    rng = np.random.default_rng([seed, 0])
    cands = candidate_mixtures(w_prev, caps, m.n_candidates, m.concentration, rng)
    probe = ProbeSettings(steps=m.probe_steps, lr=m.probe_lr or p.lr * p.min_lr_ratio,
                          batch_size=m.probe_batch_size or p.batch_size,
                          seq_len=p.seq_len, weight_decay=p.weight_decay, grad_clip=p.grad_clip)
    device = pick_device(cfg.influence.device)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_tokenizer_dir(run, checkpoint)))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    val = validation_by_task(run, tokenizer, tasks, cfg.influence.max_seq_len, cfg.influence.batch_tokens, eos, pad,
                             device)
    pools = group_pools(run, [g for g, t in zip(groups, tokens) if t > 0], cfg.tikmix.group_by,
                        probe.steps * probe.batch_size * (probe.seq_len + 1), tokenizer, seed)
    live = [g for g, t in zip(groups, tokens) if t > 0]
    live_idx = [groups.index(g) for g in live]
    changes, before = probe_changes(checkpoint, cands[:, live_idx], live, pools, val, probe, seed, device, log)
    gi_live = np.nan_to_num(gi, nan=0.0)
    task_weights = d.task_weights or {t: 1.0 for t in tasks}
    fitted = fit_regressors(cands, changes, tasks, m, gi=gi_live if m.use_gi_feature else None, seed=seed)
    res = search(fitted, groups, w_prev, caps, {t: task_weights.get(t, 0.0) for t in tasks}, m, seed=seed)
    log("tikmix-m: held-out Spearman per task: " + ", ".join(f"{t} {v:+.2f}" for t, v in
                                                              res.heldout_spearman.items()))
    return {"variant": "m", **res.to_json(), "caps": dict(zip(groups, map(float, caps))),
            "w_prev": dict(zip(groups, map(float, w_prev))), "g_hat": None,
            "candidates": cands.tolist(), "measured_changes": changes.tolist(), "loss_before": before}


def _caps(tokens: np.ndarray, stage_tokens: int, repetition_factor: float | None) -> np.ndarray:
    if repetition_factor is None:
        return np.where(tokens > 0, 1.0, 0.0)
    return np.minimum(1.0, repetition_factor * tokens / stage_tokens)


def proxy_group_influence(cfg: Config, work: Path, log: Callable[[str], None] = print) -> tuple[int, Path, Path]:
    """Group Influence at the proxy checkpoint tikmix.checkpoint (default: the last), kept in
    work/gi/step=<N>-<estimate>/ and recorded in work/tikmix.duckdb; (step, checkpoint, GI directory)."""
    from automixer_ops.tikmix.group_influence import group_influence, record

    run = RunDir(cfg.run_dir)
    step, ckpt = checkpoint_step(cfg, run)
    settings = gi_settings(cfg, seed=cfg.run.seed)  # the GI sample: the run's, shared by every draw seed
    gi_dir = work / "gi" / f"step={step}-{settings.estimate}"
    group_influence(run, ckpt, list(cfg.tasks.names()), settings, gi_dir, log)
    record(work / DB_NAME, gi_dir, f"proxy:step-{step}", step)
    return step, ckpt, gi_dir


def tikmix_mixture(cfg: Config, variant: Literal["d", "m"], out: Path, token_budget: int, seed: int, work: Path,
                   log: Callable[[str], None] = print) -> Path:
    """Write the mixture directory `out` (the mixture/ contract) for a static TiKMiX mixture; returns out."""
    from automixer_ops.baselines.common import (already_drawn, draw_groups, permutation_order, read_corpus_index,
                                                summarize, write_mixture)
    from automixer_ops.tikmix.group_influence import read_gi_json

    if variant not in VARIANTS:
        raise ConfigError(f"tikmix variant: 'd' or 'm', got {variant!r}")
    if cfg.tikmix.group_by != "source":
        raise ConfigError(f"tikmix.group_by: {cfg.tikmix.group_by!r} can be measured (`automixer group-influence`) "
                          "but a mixture draws by source only, for now; set tikmix.group_by: source")
    run = RunDir(cfg.run_dir)
    step, ckpt, gi_dir = proxy_group_influence(cfg, work, log)
    gi_parquet = gi_dir / "gi.parquet"
    tasks = list(cfg.tasks.names())
    settings = gi_settings(cfg, seed=cfg.run.seed)

    index = read_corpus_index(run)
    groups = list(index.source_names)
    tokens = index.source_tokens()
    natural = tokens / tokens.sum()
    gi = read_gi_matrix(gi_parquet, tasks, groups)
    inputs = {"version": VERSION, "variant": variant, "token_budget": token_budget, "seed": seed,
              "gi": read_gi_json(gi_dir)["fingerprint"], "tikmix": asdict(cfg.tikmix),
              "docs_per_part": cfg.mix.docs_per_part, "corpus": run.corpus_fingerprint()}
    if variant == "m":
        inputs["probe"] = {k: getattr(cfg.proxy, k) for k in ("lr", "min_lr_ratio", "batch_size", "seq_len",
                                                              "weight_decay", "grad_clip")}
    input_fp = fingerprint(inputs)
    if already_drawn(out, input_fp):
        log(f"tikmix-{variant} (seed {seed}): already drawn -> {out}")
        return out

    solved = solve(variant, cfg, run, ckpt, groups, tasks, gi, tokens, token_budget, natural, seed, log)
    weights = np.array([solved["weights"][g] for g in groups])
    atomic_write_text(work / f"solve-{variant}-step={step}-seed={seed}.json", json.dumps(solved, indent=2) + "\n")
    version = f"static-{variant}-step={step}-seed={seed}"
    record_weights(work / DB_NAME, [
        {"version": version, "stage": 0, "checkpoint": f"proxy:step-{step}", "variant": variant, "group_name": g,
         "weight": float(w), "w_prev": float(p), "cap": (solved.get("caps") or {}).get(g),
         "gi_hat": (solved.get("g_hat") or {}).get(g), "tokens_available": int(t)}
        for g, w, p, t in zip(groups, weights, natural, tokens)])

    rng = np.random.default_rng(seed)
    quotas = {g: float(w) * token_budget for g, w in zip(groups, weights)}
    idx, rep = draw_groups(index.n_tokens, index.source_rows(), quotas, permutation_order(rng),
                           f"tikmix-{variant}: the corpus {run.corpus}")
    summary = {"method": f"tikmix-{variant}", "kind": f"tikmix-{variant}", "input_fingerprint": input_fp,
               "seed": seed, **summarize(index, idx, rep, token_budget), "corpus_documents": len(index),
               "corpus_tokens": int(tokens.sum()), "corpus_fingerprint": inputs["corpus"],
               "tikmix": {"checkpoint_step": step, "variant": variant, "weights": solved["weights"],
                          "gi": str(gi_parquet), "estimate": settings.estimate}}
    summary = write_mixture(index, idx, rep, rng, out, summary, cfg.mix.docs_per_part, cfg.regroup.memory_limit)
    log(f"tikmix-{variant} (seed {seed}): {summary['documents']:,} documents, {summary['tokens']:,} tokens "
        f"(budget {token_budget:,}) -> {out}")
    return out
