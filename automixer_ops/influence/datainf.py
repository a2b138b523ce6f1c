"""DataInf (Kwon et al. 2024) on the embedding and output layers, exactly as DESIGN §2.

    lambda_l = 0.1 / (n d_l) * sum_i ||g_il||^2
    c_il     = (v_l . g_il) / (lambda_l + ||g_il||^2)
    r_l      = (v_l - (1/n) sum_i c_il g_il) / lambda_l
    utility(x) = sum_l r_l . g_l(x)          (= -DataInf influence; positive is helpful)

lambda needs every fit sample's ||g||^2 and r needs lambda, so the fit reads its samples
twice (pass 1: norms and v.g; pass 2: sum_i c_i g_i), and scoring reads the corpus once
more. fit_and_score_in_memory keeps every batch's state from pass 1 instead (small n only).
Per-sample values are fp32; sums over the fit set are fp64.

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
    return _stats_of((BatchGrads(model, batch, **kw) for batch in batches), v, mode)


def _stats_of(grads: Iterable[BatchGrads], v: dict[str, torch.Tensor], mode: str) -> tuple[SampleStats, torch.Tensor]:
    stats, losses = SampleStats(), []
    for bg in grads:
        stats.extend(SampleStats(*bg.sq_norms_and_dots(v, mode)))
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
    """The whole fit on batches held in memory (tests, benchmarks); the step streams shards instead.
    Each batch's model run is redone in pass 2 (as the step does); see fit_and_score_in_memory."""
    v = _mean_gradient(model, val, **kw)
    stats, _ = sample_stats(model, fit_batches, v, mode, **kw)
    return _fit_from_stats(model, v, stats, (BatchGrads(model, batch, **kw) for batch in fit_batches))


def fit_and_score_in_memory(model, val: Iterable[tuple[Batch, torch.Tensor]], batches: list[Batch],
                            mode: str = "auto", **kw) -> tuple[Fit, torch.Tensor]:
    """fit_in_memory(batches) and utilities(batches) at once, running the model once per batch.

    Each batch's `BatchGrads` is built once, in pass 1, and kept: pass 2 (sum_i c_i g_i) and pass 3
    (r . g_i, by `dots`; no `project=` folding, r being unknown when the states are built) are then only
    output-layer algebra on the kept states, with no model run. Like dattri's cache of all n per-sample
    gradients, this holds every batch's state at once: about tokens x (vocab + 3 hidden) fp32 values (softmax
    residual, final hidden state, embedding-output gradient and its per-token sums), e.g. 4.1 GiB for
    n = 1024 samples of 128 tokens at vocabulary 8192, hidden 64. So it is for small n (benchmarks, tests);
    the streamed step (`automixer score`) cannot keep the corpus's states and reads it three times
    (fit_in_memory + utilities is that computation). Returns the fit and the utilities in input order (fp32).
    """
    v = _mean_gradient(model, val, **kw)
    kept = [BatchGrads(model, batch, **kw) for batch in batches]
    stats, _ = _stats_of(kept, v, mode)
    fit = _fit_from_stats(model, v, stats, kept)
    return fit, _utilities_of(kept, fit)


def _mean_gradient(model, val: Iterable[tuple[Batch, torch.Tensor]], **kw) -> dict[str, torch.Tensor]:
    return {k: t.float() for k, t in weighted_gradient_sum(model, val, **kw).items()}


def _fit_from_stats(model, v: dict[str, torch.Tensor], stats: SampleStats, grads: Iterable[BatchGrads]) -> Fit:
    """lambda from pass 1's stats, then pass 2 over `grads` (the fit batches' states, in the same order)."""
    n = len(stats)
    sum_sq = {k: float(t.double().sum()) for k, t in stats.sq.items()}
    lam = damping(sum_sq, n, {k: t.numel() for k, t in v.items()})
    coeff = coefficients(stats, lam)
    c_sum, start = zeros_like_layers(model), 0
    for bg in grads:
        for k in c_sum:  # each layer has its own coefficients
            bg.accumulate(coeff[k][start:start + bg.B], {k: c_sum[k]})
        start += bg.B
    return finish(v, c_sum, n, lam, sum_sq)


def utilities(model, batches: Iterable[Batch], fit: Fit, **kw) -> torch.Tensor:
    """Scoring: u(x) = sum_l r_l . g_l(x) for every sample, in input order (fp32)."""
    project = tuple(t for k, t in fit.r.items() if k != "embed")
    return _utilities_of((BatchGrads(model, batch, project=project, **kw) for batch in batches), fit)


def _utilities_of(grads: Iterable[BatchGrads], fit: Fit) -> torch.Tensor:
    out = [sum(bg.dots(fit.r).values()) for bg in grads]
    return torch.cat(out) if out else torch.zeros(0)
