"""TiKMiX-M's probes: a short continued training of a checkpoint on a candidate mixture, and the change
of every task's validation loss it causes.

A probe starts from the checkpoint's weights with a fresh AdamW at a constant learning rate
(`tikmix.m.probe_lr`, default the training's final rate: the checkpoint is continued, not
re-warmed) and trains `probe_steps` steps of `batch_size` sequences of `seq_len` tokens. Each
sequence comes from one group, drawn with the candidate's weights, and is a random window of
that group's token pool: the group's documents in the seeded hash order (the order Group
Influence samples them in), EOS after each, enough tokens for a probe that draws only from
it. The validation loss of a task is the one DataInf differentiates (`group_influence.
validation_by_task`: the mean over its validation documents of the gold continuation's mean
cross-entropy), measured before and after; a negative change is an improvement.

Every probe draws from the same np.random.default_rng([seed, 2]) stream (common random numbers: the
same uniforms pick each slot's group by inverse CDF of the candidate's weights, and the same window
offsets follow), so two candidates' changes differ by their mixtures more than by sampling noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from automixer_ops.errors import AutomixerError


@dataclass(frozen=True)
class ProbeSettings:
    steps: int
    lr: float
    batch_size: int
    seq_len: int
    weight_decay: float
    grad_clip: float


def group_pools(run, groups: list[str], group_by: str, tokens_needed: int, tokenizer, seed: int) -> dict[str, np.ndarray]:
    """Per group: its documents' tokens (EOS after each) in the seeded hash order, at least tokens_needed of them
    (all of the group when it has fewer)."""
    import duckdb

    from automixer_ops.sqlrun import literal_paths

    con = duckdb.connect()
    out = {}
    for g in groups:
        cur = con.execute(f"""SELECT text FROM read_parquet($p) WHERE CAST("{group_by}" AS VARCHAR) = $g
                              ORDER BY hash($seed, CAST(id AS VARCHAR)), CAST(id AS VARCHAR)""",
                          {"p": literal_paths(run.corpus_shards()), "g": g, "seed": seed})
        ids: list[int] = []
        while len(ids) < tokens_needed:
            rows = cur.fetchmany(256)
            if not rows:
                break
            for e in tokenizer.backend_tokenizer.encode_batch_fast([r[0] for r in rows], add_special_tokens=False):
                ids.extend(e.ids)
                ids.append(tokenizer.eos_token_id)
        if len(ids) < 2:
            raise AutomixerError(f"tikmix-m: group {g!r} has no tokens to probe with")
        out[g] = np.asarray(ids, dtype=np.int64)
    return out


def validation_loss(model, val: dict[str, list]) -> dict[str, float]:
    """Per task: sum over its batches of weight_i x (sample i's mean gold-continuation cross-entropy)."""
    import torch

    out = {}
    with torch.no_grad():
        for task, batches in val.items():
            total = 0.0
            for batch, w in batches:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
                ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:],
                                                       reduction="none")
                per_sample = (ce * batch.loss_weight[:, :-1]).sum(1)
                total += float((per_sample * w.to(per_sample.device)).sum())
            out[task] = total
    return out


def probe_changes(checkpoint: Path, candidates: np.ndarray, groups: list[str], pools: dict[str, np.ndarray],
                  val: dict[str, list], settings: ProbeSettings, seed: int, device: str,
                  log: Callable[[str], None] = print) -> tuple[np.ndarray, dict[str, float]]:
    """(K, tasks) changes of the validation losses after a probe on each candidate (rows of candidates, in
    `groups` order), and the losses before."""
    import torch

    from automixer_ops.checkpoints import load_causal_lm

    base = load_causal_lm(checkpoint, torch.float32).to(device)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    base.eval()
    before = validation_loss(base, val)
    tasks = list(val)
    changes = np.zeros((len(candidates), len(tasks)))
    for k, w in enumerate(candidates):
        base.load_state_dict(state)
        model = base.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        rest = [p for n, p in model.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=settings.lr)
        rng = np.random.default_rng([seed, 2])  # common random numbers: every probe sees the same draws
        for _ in range(settings.steps):
            x = torch.from_numpy(_windows(pools, groups, w, settings, rng)).to(device)
            loss = model(input_ids=x, labels=x).loss
            if not torch.isfinite(loss):
                raise AutomixerError(f"tikmix-m: probe {k} diverged (loss {float(loss)}); lower tikmix.m.probe_lr")
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        after = validation_loss(model, val)
        changes[k] = [after[t] - before[t] for t in tasks]
        log(f"tikmix-m: probe {k + 1}/{len(candidates)}: mean change of the validation losses "
            f"{changes[k].mean():+.4f}")
    base.load_state_dict(state)
    return changes, before


def _windows(pools, groups, w, settings: ProbeSettings, rng: np.random.Generator) -> np.ndarray:
    """batch_size windows of seq_len tokens, each from a group drawn with weights w."""
    out = np.empty((settings.batch_size, settings.seq_len), dtype=np.int64)
    p = np.clip(np.asarray(w, dtype=np.float64), 0, None)
    # Inverse CDF on shared uniforms: probes with similar weights pick the same groups for the same slots.
    cdf = np.cumsum(p / p.sum())
    picks = np.minimum(np.searchsorted(cdf, rng.random(settings.batch_size), side="right"), len(groups) - 1)
    for i, g in enumerate(picks):
        pool = pools[groups[g]]
        if len(pool) <= settings.seq_len:
            reps = -(-(settings.seq_len + 1) // len(pool))
            pool = np.tile(pool, reps)
        start = rng.integers(0, len(pool) - settings.seq_len)
        out[i] = pool[start:start + settings.seq_len]
    return out
