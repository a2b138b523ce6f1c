"""Dynamic TiKMiX: a target model trained in S stages, its mixture re-solved at every stage boundary.

    train_dynamic(cfg, variant, out, target, token_budget, seed, log) -> checkpoints by step

The target's N steps (ceil(token_budget / tokens per step), as `train-target`) are cut into S
stages at steps b_s = round(s N / S). Stage 0 trains on the corpus' natural token shares (a
model at initialisation has no preferences to measure). At each boundary b_s (s >= 1) the
target's own checkpoint is measured: Group Influence on a per-group sample (`tikmix.estimate`,
the same documents at every stage, so that a change of ranking is the model's), then
TiKMiX-D (or -M) with the previous stage's weights as w_prev (D's KL term) and the stage's
tokens for the caps; training continues on the new mixture with the optimizer, the learning
rate schedule and the data position carried over:

* one trainer run (trainer.py) over all N steps, checkpointing at every boundary; a stage
  is a stretch of its micro-batches (`StagedBatches`), so resuming a killed run is exact;
* each group's documents are read in one seeded permutation across stages (a cursor per
  group): a stage takes the next documents of each group, and a group read to its end
  starts again (repeat + 1), so no stage re-reads what an earlier one took while unread
  documents remain.

Outputs under `out`: checkpoints/, train_log.jsonl, stages/stage-<s>/ (the stage's mixture in
the mixture/ contract, and its packed tokens), gi/step=<b>/ (each boundary's Group Influence),
tikmix.duckdb (tables group_influence and tikmix_weights, version `dynamic-<variant>-seed-<seed>`),
stages.json (per stage: steps, tokens, weights, the solve, and the Spearman correlation of the
group ranking with the previous stage's), stages.png (the weights per stage).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from automixer_ops.config import Config, TargetSection
from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import RunDir, atomic_write, atomic_write_text, file_hash, fingerprint

STAGES_JSON = "stages.json"
SOLVE_JSON = "solve.json"  # stages/stage-<s>/: the stage's solve and the inputs it was made from
VERSION = 1


class StagedBatches:
    """Micro-batch i: its step's stage, and the stage's windows in order from the stage's start (wrapping)."""

    def __init__(self, streams: list[np.ndarray], bounds: list[int], seq_len: int, batch_size: int, grad_accum: int):
        self.streams, self.bounds = streams, bounds
        self.seq_len, self.batch_size, self.grad_accum = seq_len, batch_size, grad_accum
        self.windows = [len(t) // seq_len for t in streams]
        if any(w < 1 for w in self.windows):
            raise AutomixerError(f"a stage's mixture holds less than one sequence of {seq_len} tokens")
        self.n_windows, self.n_tokens = sum(self.windows), sum(len(t) for t in streams)

    def batch(self, micro_batch_index: int):
        import torch

        step = micro_batch_index // self.grad_accum  # 0-based: the optimizer step this micro-batch belongs to
        s = bisect_right(self.bounds, step) - 1
        if s >= len(self.streams):
            raise AutomixerError(f"step {step + 1} belongs to stage {s}, whose mixture is not drawn yet")
        local = micro_batch_index - self.bounds[s] * self.grad_accum
        tokens, n = self.streams[s], self.windows[s]
        rows = [(local * self.batch_size + j) % n for j in range(self.batch_size)]
        x = np.stack([tokens[w * self.seq_len:(w + 1) * self.seq_len] for w in rows]).astype(np.int64)
        return torch.from_numpy(x)


def stage_bounds(steps: int, stages: int) -> list[int]:
    """[b_0 = 0, ..., b_S = steps], S capped at the number of steps."""
    s = max(1, min(stages, steps))
    return [round(i * steps / s) for i in range(s + 1)]


class Cursors:
    """Each group's documents in one seeded permutation, read on from stage to stage."""

    def __init__(self, index, seed: int):
        self.index = index
        rows = index.source_rows()
        self.perm = {g: rows[g][np.random.default_rng([seed, 4, i]).permutation(len(rows[g]))]
                     for i, g in enumerate(index.source_names)}
        self.pos = {g: 0 for g in index.source_names}

    def draw(self, quotas: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """Each group's next documents until its quota (the rounding carried from group to group, in name order);
        (document indices, repeats)."""
        idx, rep, carry = [], [], 0.0
        for g in sorted(quotas):
            target = quotas[g] + carry
            perm, pos = self.perm[g], self.pos[g]
            taken, got = [], 0
            if target > 1e-6:
                if len(perm) == 0 or self.index.n_tokens[perm].sum() == 0:
                    raise AutomixerError(f"dynamic tikmix: group {g!r} has no tokens, but {target:,.0f} were asked for")
                while got < target - 1e-6:
                    doc = perm[pos % len(perm)]
                    taken.append((doc, pos // len(perm)))
                    got += int(self.index.n_tokens[doc])
                    pos += 1
            self.pos[g] = pos
            carry = target - got
            if taken:
                idx.append(np.array([d for d, _ in taken], dtype=np.int64))
                rep.append(np.array([r for _, r in taken], dtype=np.int32))
        if not idx:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        return np.concatenate(idx), np.concatenate(rep)


def _spearman(a: dict[str, float] | None, b: dict[str, float] | None) -> float | None:
    from scipy.stats import spearmanr

    if not a or not b:
        return None
    keys = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None)
    x, y = [a[k] for k in keys], [b[k] for k in keys]
    if len(keys) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def train_dynamic(cfg: Config, variant: Literal["d", "m"], out: Path, target: TargetSection, token_budget: int,
                  seed: int, log: Callable[[str], None] = print, until_stage: int | None = None,
                  measure_only: bool = False) -> dict[int, Path]:
    """Train (or resume) the staged target; returns its checkpoints by step.

    until_stage: stop after that stage (its boundary checkpoint saved); measure_only: for the last stage run, only
    measure, solve and draw its mixture (an Airflow task of its own), not train it. Each stage's work is kept, so
    calling this stage by stage (the `automixer_tikmix` DAG) or all at once gives the same model."""
    from transformers import AutoTokenizer

    from automixer_ops.baselines.common import already_drawn, read_corpus_index, summarize, write_mixture
    from automixer_ops.mixture_io import PART_GLOB
    from automixer_ops.checkpoints import list_checkpoints
    from automixer_ops.tikmix.group_influence import group_influence, read_gi_json, record
    from automixer_ops.tikmix.method import DB_NAME, gi_settings, read_gi_matrix, record_weights, solve
    from automixer_ops.trainer import TrainJob, pack_documents, settings_fingerprint, train

    if cfg.tikmix.group_by != "source":
        raise AutomixerError(f"tikmix.group_by: {cfg.tikmix.group_by!r}: a mixture draws by source only, for now")
    run = RunDir(cfg.run_dir)
    if not (run.tokenizer / "tokenizer.json").is_file():
        raise AutomixerError(f"{run.path}: not a prepared run (no tokenizer); dynamic TiKMiX needs the run's corpus and "
                             "validation sets: run `automixer prepare`, `train-proxy` and `evaluate` first")
    tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer))
    settings = target.training(token_budget)
    bounds = stage_bounds(settings.max_steps, cfg.tikmix.stages)
    per_step = settings.seq_len * settings.batch_size * settings.grad_accum
    index = read_corpus_index(run)
    groups = list(index.source_names)
    available = index.source_tokens()
    natural = available / available.sum()
    tasks = list(cfg.tasks.names())
    gi_set = gi_settings(cfg, seed=cfg.run.seed)  # the same documents at every stage and for every seed
    plan = {"version": VERSION, "variant": variant, "bounds": bounds, "tikmix": cfg.tikmix, "tasks": tasks,
            "corpus": run.corpus_fingerprint(), "token_budget": token_budget, "influence": cfg.influence}
    from automixer_ops.config import plain_data

    plan_id = fingerprint(plain_data(plan))
    job_fp = {"target": settings_fingerprint(settings), "seed": seed, "tikmix": plan_id,
              "tokenizer": file_hash(run.tokenizer / "tokenizer.json")}
    log(f"dynamic tikmix-{variant}: {settings.max_steps} steps in {len(bounds) - 1} stages at {bounds[1:-1]}, "
        f"{per_step:,} tokens a step, seed {seed} -> {out}")

    last = len(bounds) - 2 if until_stage is None else until_stage
    if not 0 <= last < len(bounds) - 1:
        raise AutomixerError(f"--stage {until_stage}: this run has stages 0..{len(bounds) - 2}")
    cursors = Cursors(index, seed)
    streams, stages, w = [], [], natural
    version = f"dynamic-{variant}-seed-{seed}"
    ckpts: dict[int, Path] = {}
    for s in range(last + 1):
        start, end = bounds[s], bounds[s + 1]
        stage_tokens = (end - start) * per_step
        solved, label = None, None
        if s > 0:
            ckpt = out / "checkpoints" / f"step-{start}"
            gi_dir = out / "gi" / f"step={start}"
            label = f"target:step-{start}"
            gi = read_gi_matrix(group_influence(run, ckpt, tasks, gi_set, gi_dir, log), tasks, groups)
            record(out / DB_NAME, gi_dir, label, start)
            # A stage is solved once: its tasks (measure, train) and every later call reuse the recorded solve
            # (TiKMiX-M's probes are the costly part, and a GPU's may not repeat bit for bit).
            solve_fp = fingerprint({"plan": plan_id, "seed": seed, "stage": s, "gi": read_gi_json(gi_dir)["fingerprint"],
                                    "w_prev": [float(x) for x in w]})
            solved = _read_solve(out / "stages" / f"stage-{s}" / SOLVE_JSON, solve_fp)
            if solved is None:
                solved = solve(variant, cfg, run, ckpt, groups, tasks, gi, available, stage_tokens, w, seed, log,
                               training=settings)
                atomic_write_text(out / "stages" / f"stage-{s}" / SOLVE_JSON,
                                  json.dumps({"fingerprint": solve_fp, "solve": solved}, default=float) + "\n")
            w = np.array([solved["weights"][g] for g in groups])
        stage_dir = out / "stages" / f"stage-{s}"
        quotas = {g: float(x) * stage_tokens for g, x in zip(groups, w)}
        idx, rep = cursors.draw(quotas)
        stage_fp = fingerprint({"plan": plan_id, "seed": seed, "stage": s, "weights": [float(x) for x in w]})
        if not already_drawn(stage_dir / "mixture", stage_fp):
            trained_past = [c for c in list_checkpoints(RunDir(out)) if c > start]
            if (stage_dir / "mixture").exists() and trained_past:
                raise AutomixerError(f"{stage_dir}: stage {s}'s mixture would change (its Group Influence, the "
                                     f"validation sets or the settings did), but the target already trained past step "
                                     f"{start} on the old one (checkpoints {trained_past}); delete {out} to train it again")
            summary = {"method": f"tikmix-{variant}-dynamic", "kind": f"tikmix-{variant}-dynamic", "seed": seed,
                       "stage": s, "steps": [start, end], "input_fingerprint": stage_fp,
                       **summarize(index, idx, rep, stage_tokens), "corpus_fingerprint": plan["corpus"]}
            write_mixture(index, idx, rep, np.random.default_rng([seed, 3, s]), stage_dir / "mixture", summary,
                          cfg.mix.docs_per_part, cfg.regroup.memory_limit)
        parts = sorted((stage_dir / "mixture").glob(PART_GLOB))
        streams.append(pack_documents(parts, stage_dir / "data", tokenizer, {"stage": stage_fp}, log))
        record_weights(out / DB_NAME, [
            {"version": f"{version}-stage-{s}", "stage": s, "checkpoint": label or "init", "variant": variant,
             "group_name": g, "weight": float(x), "w_prev": float(p), "cap": None if solved is None else
             (solved.get("caps") or {}).get(g), "gi_hat": None if solved is None else (solved.get("g_hat") or {}).get(g),
             "tokens_available": int(t)}
            for g, x, p, t in zip(groups, w, stages[-1]["weights"].values() if stages else natural, available)])
        stages.append({"stage": s, "steps": [start, end], "tokens": stage_tokens, "checkpoint": label,
                       "weights": dict(zip(groups, map(float, w))),
                       "g_hat": None if solved is None else solved.get("g_hat"),
                       "solve": solved and {k: v for k, v in solved.items() if k not in ("candidates",)}})
        prev = stages[-2] if len(stages) > 1 else None
        stages[-1]["spearman_g_hat_vs_previous"] = _spearman(prev and prev["g_hat"], stages[-1]["g_hat"])
        stages[-1]["spearman_weights_vs_previous"] = _spearman(prev and prev["weights"], stages[-1]["weights"])

        if measure_only and s == last:
            break
        data = StagedBatches(streams, bounds, settings.seq_len, settings.batch_size, settings.grad_accum)
        job = TrainJob(name=f"tikmix-{variant}-dynamic", run=RunDir(out), settings=settings, seed=seed, data=data,
                       tokenizer=tokenizer, fingerprint=job_fp, log_path=out / "train_log.jsonl",
                       retrain_hint=f"delete {out}/checkpoints to train this target again", save_steps=set(bounds[1:]))
        ckpts = train(job, log, stop_at=end)
    # A call for an earlier stage (a cleared Airflow task) keeps the later stages already recorded.
    before = _read_json(out / STAGES_JSON)
    if before and before.get("bounds") == bounds and len(before.get("stages", [])) > len(stages):
        stages += before["stages"][len(stages):]
    done = settings.max_steps in list_checkpoints(RunDir(out))
    atomic_write_text(out / STAGES_JSON, json.dumps({"bounds": bounds, "groups": groups, "stages": stages,
                                                      "complete": len(stages) == len(bounds) - 1 and done},
                                                     indent=2, default=float) + "\n")
    plot_stages(stages, groups, out / "stages.png")
    return ckpts


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_solve(path: Path, solve_fp: str) -> dict | None:
    """A stage's recorded solve, when it was made from these inputs."""
    saved = _read_json(path)
    return saved["solve"] if saved and saved.get("fingerprint") == solve_fp else None


def plot_stages(stages: list[dict], groups: list[str], path: Path) -> None:
    """The weights of each stage as stacked bars (the corpus' groups in name order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(stages), 4))
    bottom = np.zeros(len(stages))
    cmap = plt.get_cmap("tab20")
    for i, g in enumerate(groups):
        h = np.array([st["weights"][g] for st in stages])
        ax.bar(range(len(stages)), h, bottom=bottom, label=g, color=cmap(i % 20))
        bottom += h
    ax.set_xticks(range(len(stages)), [f"stage {st['stage']}\nsteps {st['steps'][0]}-{st['steps'][1]}"
                                       for st in stages], fontsize=8)
    ax.set_ylabel("weight (token share)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title("TiKMiX: the mixture of each stage")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
