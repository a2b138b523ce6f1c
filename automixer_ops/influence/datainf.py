"""DataInf (Kwon et al. 2024) on the embedding and output layers, exactly as DESIGN §2.

    lambda_l = 0.1 / (n d_l) * sum_i ||g_il||^2
    c_il     = (v_l . g_il) / (lambda_l + ||g_il||^2)
    r_l      = (v_l - (1/n) sum_i c_il g_il) / lambda_l
    utility(x) = sum_l r_l . g_l(x)          (= -DataInf influence; positive is helpful)

lambda needs every fit sample's ||g||^2 and r needs lambda, so the fit reads its samples
twice (pass 1: norms and v.g; pass 2: sum_i c_i g_i), and scoring reads the corpus once
more. Per-sample values are fp32; sums over the fit set are fp64.

These functions work on iterables of `Batch`es, so the step (influence/score.py), the
tests and the benchmarks share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from automixer_ops.influence.grads import Batch, BatchGrads, layer_weights


@dataclass
class SampleStats:
    """Pass 1 output for a run of samples, in input order: ||g_il||^2 and v_l.g_il per layer."""

    sq: dict[str, torch.Tensor] = field(default_factory=dict)
    vdot: dict[str, torch.Tensor] = field(default_factory=dict)

    def extend(self, other: "SampleStats") -> None:
        for key in other.sq:
            self.sq[key] = torch.cat([self.sq[key], other.sq[key]]) if key in self.sq else other.sq[key]
            self.vdot[key] = torch.cat([self.vdot[key], other.vdot[key]]) if key in self.vdot else other.vdot[key]

    def __len__(self) -> int:
        return len(next(iter(self.sq.values()))) if self.sq else 0


@dataclass
class Fit:
    """What scoring needs (r per layer) and what reproduces it."""

    n: int
    dims: dict[str, int]
    lam: dict[str, float]
    sum_sq: dict[str, float]
    r: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]


def zeros_like_layers(model, dtype=torch.float64) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(w.shape, dtype=dtype, device=w.device) for k, w in layer_weights(model).items()}


def weighted_gradient_sum(model, batches: Iterable[tuple[Batch, torch.Tensor]], acc=None, **kw):
    """sum over samples of coeff_i * g_i, per layer, in fp64 (v with coeff = averaging weights)."""
    acc = zeros_like_layers(model) if acc is None else acc
    for batch, coeff in batches:
        BatchGrads(model, batch, **kw).accumulate(coeff, acc)
    return acc


def sample_stats(model, batches: Iterable[Batch], v: dict[str, torch.Tensor], mode: str = "auto",
                 **kw) -> tuple[SampleStats, torch.Tensor]:
    """Pass 1: per-sample squared norms and v-dots (and the per-sample losses, for NaN checks)."""
    stats, losses = SampleStats(), []
    for batch in batches:
        bg = BatchGrads(model, batch, **kw)
        stats.extend(SampleStats(bg.sq_norms(mode), bg.dots(v)))
        losses.append(bg.loss_per_sample)
    return stats, (torch.cat(losses) if losses else torch.zeros(0))


def damping(sum_sq: dict[str, float], n: int, dims: dict[str, int]) -> dict[str, float]:
    return {k: 0.1 * sum_sq[k] / (n * dims[k]) for k in sum_sq}


def coefficients(stats: SampleStats, lam: dict[str, float]) -> dict[str, torch.Tensor]:
    return {k: stats.vdot[k].double() / (lam[k] + stats.sq[k].double()) for k in stats.sq}


def finish(v: dict[str, torch.Tensor], c_sum: dict[str, torch.Tensor], n: int, lam: dict[str, float],
           sum_sq: dict[str, float]) -> Fit:
    """r_l = (v_l - c_sum_l / n) / lambda_l, with c_sum_l = sum_i c_il g_il (fp64)."""
    r = {k: ((v[k].double() - c_sum[k] / n) / lam[k]).float() for k in v}
    return Fit(n=n, dims={k: v[k].numel() for k in v}, lam=lam, sum_sq=sum_sq, r=r,
               v={k: t.float() for k, t in v.items()})


def fit_in_memory(model, val: Iterable[tuple[Batch, torch.Tensor]], fit_batches: list[Batch],
                  mode: str = "auto", **kw) -> Fit:
    """The whole fit on batches held in memory (tests, benchmarks); the step streams shards instead."""
    v = {k: t.float() for k, t in weighted_gradient_sum(model, val, **kw).items()}
    stats, _ = sample_stats(model, fit_batches, v, mode, **kw)
    n = len(stats)
    sum_sq = {k: float(t.double().sum()) for k, t in stats.sq.items()}
    lam = damping(sum_sq, n, {k: t.numel() for k, t in v.items()})
    coeff = coefficients(stats, lam)
    c_sum, start = zeros_like_layers(model), 0
    for batch in fit_batches:
        size = batch.input_ids.shape[0]
        bg = BatchGrads(model, batch, **kw)
        for k in c_sum:  # each layer has its own coefficients
            bg.accumulate(coeff[k][start:start + size], {k: c_sum[k]})
        start += size
    return finish(v, c_sum, n, lam, sum_sq)


def utilities(model, batches: Iterable[Batch], fit: Fit, **kw) -> torch.Tensor:
    """Scoring: u(x) = sum_l r_l . g_l(x) for every sample, in input order (fp32)."""
    out, project = [], tuple(t for k, t in fit.r.items() if k != "embed")
    for batch in batches:
        dots = BatchGrads(model, batch, project=project, **kw).dots(fit.r)
        out.append(sum(dots.values()))
    return torch.cat(out) if out else torch.zeros(0)
