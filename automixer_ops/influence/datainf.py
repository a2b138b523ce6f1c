"""DataInf (Kwon et al. 2024) on the embedding and output layers, exactly as DESIGN §2.

    lambda_l = 0.1 / (n d_l) * sum_i ||g_il||^2
    c_il     = (v_l . g_il) / (lambda_l + ||g_il||^2)
    r_l      = (v_l - (1/n) sum_i c_il g_il) / lambda_l
    utility(x) = sum_l r_l . g_l(x)          (= -DataInf influence; positive is helpful)

lambda needs every fit sample's ||g||^2 and r needs lambda, so sum_i c_i g_i cannot be
formed as the samples go by. But with a_i = v.g_i, b_i = ||g_i||^2 and rho_i = lambda/b_i,

    c_i = a_i / (b_i + lambda) = (a_i / b_i) * sum_k (-rho_i)^k
    sum_i c_i g_i = sum_k (-lambda)^k * sum_i (a_i / b_i^(k+1)) g_i

and the inner sums need no lambda: pass 1 forms them (K = SERIES_TERMS terms) next to the
norms. Cutting the series after K terms changes c_i by a relative rho_i^K. Since
lambda = 0.1 mean(b) / d with d the layer's size (10^5..10^8), rho_i is about 1e-6..1e-9
for all but near-zero gradients; once lambda is known, every sample with rho_i <= 1e-4
(coefficient error <= 1e-8) is done, and pass 2 rereads only the others (and the samples
pass 1 left out of the sums because their gradient was tiny against the running lambda),
adding c_i minus their series part. So the fit usually reads its samples once, and never
gives up exactness: the bound is checked per sample. Scoring reads the corpus once more.
fit_and_score_in_memory keeps every batch's state from pass 1 instead (small n only).
Per-sample values are fp32; sums over the fit set are fp64.

These functions work on iterables of `Batch`es, so the step (influence/score.py), the
tests and the benchmarks share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from automixer_ops.influence.grads import Batch, BatchGrads, Workspace, layer_weights

SERIES_TERMS = 2  # K: terms of the series kept by pass 1
SERIES_MAX_RATIO = 1e-4  # rho_i up to which the series is used for sample i (relative error rho^K <= 1e-8)
# During pass 1: a sample whose rho against the running lambda exceeds this is left out of the sums (its
# terms would swamp the fp32 batch sums) and reread by pass 2.
SERIES_DEFER_RATIO = 1e-2
# fit_and_score_in_memory: batches keep their per-sample output-layer gradients while fewer than this many
# elements are kept (2 GiB fp32; a batch keeps at most grads.KEEP_ELEMENTS more).
KEEP_IN_MEMORY_ELEMENTS = 1 << 29


@dataclass
class SampleStats:
    """Pass 1 output for a run of samples, in input order: ||g_il||^2 and v_l.g_il per layer, and whether
    the sample is in pass 1's series sums for that layer."""

    sq: dict[str, torch.Tensor] = field(default_factory=dict)
    vdot: dict[str, torch.Tensor] = field(default_factory=dict)
    in_series: dict[str, torch.Tensor] = field(default_factory=dict)

    def extend(self, other: "SampleStats") -> None:
        for part in ("sq", "vdot", "in_series"):
            mine, theirs = getattr(self, part), getattr(other, part)
            for key, t in theirs.items():
                mine[key] = torch.cat([mine[key], t]) if key in mine else t

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
    reread: int = 0  # fit samples pass 2 reran the model on (the series did not give their coefficients)


def zeros_like_layers(model, dtype=torch.float64) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(w.shape, dtype=dtype, device=w.device) for k, w in layer_weights(model).items()}


def weighted_gradient_sum(model, batches: Iterable[tuple[Batch, torch.Tensor]], acc=None, **kw):
    """sum over samples of coeff_i * g_i, per layer, in fp64 (v with coeff = averaging weights)."""
    acc, ws = zeros_like_layers(model) if acc is None else acc, Workspace()
    for batch, coeff in batches:
        BatchGrads(model, batch, workspace=ws, **kw).accumulate(coeff, acc)
    return acc


class SeriesSums:
    """Pass 1's running sums: T_lk = sum over the series samples of lam_ref_l^k a_il / b_il^(k+1) g_il.

    lam_ref_l (the running lambda when the first non-zero gradient was seen) keeps the terms near the size
    of c_i g_i; the sum over i of c_il g_il is then sum_k (-lambda_l / lam_ref_l)^k T_lk (`combine`).
    """

    def __init__(self, model, terms: int | None = None, defer_ratio: float | None = None,
                 max_ratio: float | None = None):
        """Settings default to the module's SERIES_* values."""
        layers = layer_weights(model)
        self.terms = SERIES_TERMS if terms is None else terms
        self.defer_ratio = SERIES_DEFER_RATIO if defer_ratio is None else defer_ratio
        self.max_ratio = SERIES_MAX_RATIO if max_ratio is None else max_ratio
        self.dims = {k: w.numel() for k, w in layers.items()}
        self.sums = {k: torch.zeros((self.terms, *w.shape), dtype=torch.float64, device=w.device)
                     for k, w in layers.items()}
        self.n, self.sum_sq = 0, {k: 0.0 for k in layers}
        self.lam_ref: dict[str, float | None] = {k: None for k in layers}

    def add(self, bg: BatchGrads, sq: dict[str, torch.Tensor], vdot: dict[str, torch.Tensor]) -> SampleStats:
        """Adds one batch (its pass-1 statistics, its kept gradients); returns the batch's SampleStats."""
        self.n += bg.B
        for k in self.sums:
            self.sum_sq[k] += float(sq[k].double().sum())
        in_series = {}
        for k, lam in self.damping().items():  # the running lambda
            b, a = sq[k].double(), vdot[k].double()
            if self.lam_ref[k] is None and lam > 0:
                self.lam_ref[k] = lam
            ok = (b > 0) & (lam <= self.defer_ratio * b) & torch.isfinite(a) & torch.isfinite(b)
            if self.lam_ref[k] is not None and bool(ok.any()):
                safe_b = torch.where(ok, b, 1.0)
                coeff = torch.stack([torch.where(ok, self.lam_ref[k] ** j * a / safe_b ** (j + 1), 0.0)
                                     for j in range(self.terms)])
                bg.accumulate(coeff, {k: self.sums[k]})
            in_series[k] = ok
        return SampleStats(sq=dict(sq), vdot=dict(vdot), in_series=in_series)

    def damping(self) -> dict[str, float]:
        """lambda_l of the samples added so far."""
        return damping(self.sum_sq, self.n, self.dims)

    def combine(self, lam: dict[str, float]) -> dict[str, torch.Tensor]:
        """sum_i c_il g_il over the series samples, up to a relative rho_i^K in each c_il (fp64)."""
        out = {}
        for k, t in self.sums.items():
            x = -lam[k] / self.lam_ref[k] if self.lam_ref[k] else 0.0
            out[k] = sum(x ** j * t[j] for j in range(self.terms))
        return out

    def remainders(self, stats: SampleStats, lam: dict[str, float]) -> dict[str, torch.Tensor]:
        """Pass 2's coefficients: c_il minus what the series sums hold of it; zero where the series is within its
        bound (rho_i <= max_ratio), so only the samples with a non-zero remainder need rereading (fp64)."""
        out = {}
        for k, exact in coefficients(stats, lam).items():
            a, b, ok = stats.vdot[k].double(), stats.sq[k].double(), stats.in_series[k]
            safe_b = torch.where(ok, b, 1.0)
            rho = lam[k] / safe_b
            series = (a / safe_b) * sum((-rho) ** j for j in range(self.terms))
            out[k] = torch.where(ok & (rho <= self.max_ratio), 0.0, exact - torch.where(ok, series, 0.0))
        return out

    def state_dict(self) -> dict:
        return {"sums": self.sums, "n": self.n, "sum_sq": self.sum_sq, "lam_ref": self.lam_ref,
                "settings": self.settings()}

    def settings(self) -> list:
        return [self.terms, self.defer_ratio, self.max_ratio]

    def load_state_dict(self, state: dict) -> None:
        if state["settings"] != self.settings():
            raise ValueError("the saved series sums were made with other settings")
        self.sums, self.n, self.sum_sq, self.lam_ref = state["sums"], state["n"], state["sum_sq"], state["lam_ref"]


def pass1_batch(model, batch: Batch, v: dict[str, torch.Tensor], series: SeriesSums, ws: Workspace,
                mode: str = "auto", keep: Workspace | None = None, **kw) -> tuple[SampleStats, BatchGrads]:
    """Pass 1 on one batch: its statistics, its terms added to `series`; the BatchGrads is built on `ws`.
    keep: a workspace of the batch's own in which the BatchGrads keeps its samples' output-layer gradients
    (those built whole) for later dots and sums; without it they are built in `ws` and dropped."""
    bg = BatchGrads(model, batch, workspace=ws, **kw)
    stats = series.add(bg, *bg.sq_norms_and_dots(v, mode, keep=ws if keep is None else keep))
    if keep is None:
        bg.drop_kept()
    return stats, bg


def sample_stats(model, batches: Iterable[Batch], v: dict[str, torch.Tensor], mode: str = "auto",
                 **kw) -> tuple[SampleStats, torch.Tensor]:
    """Per-sample squared norms and v-dots (and the per-sample losses, for NaN checks); no series sums."""
    stats, losses, ws = SampleStats(), [], Workspace()
    for batch in batches:
        bg = BatchGrads(model, batch, workspace=ws, **kw)
        stats.extend(SampleStats(*bg.sq_norms_and_dots(v, mode)))
        losses.append(bg.loss_per_sample)
    return stats, (torch.cat(losses) if losses else torch.zeros(0))


def damping(sum_sq: dict[str, float], n: int, dims: dict[str, int]) -> dict[str, float]:
    return {k: 0.1 * sum_sq[k] / (n * dims[k]) for k in sum_sq}


def coefficients(stats: SampleStats, lam: dict[str, float]) -> dict[str, torch.Tensor]:
    return {k: stats.vdot[k].double() / (lam[k] + stats.sq[k].double()) for k in stats.sq}


def finish(v: dict[str, torch.Tensor], c_sum: dict[str, torch.Tensor], n: int, lam: dict[str, float],
           sum_sq: dict[str, float], reread: int = 0) -> Fit:
    """r_l = (v_l - c_sum_l / n) / lambda_l, with c_sum_l = sum_i c_il g_il (fp64)."""
    r = {k: ((v[k].double() - c_sum[k] / n) / lam[k]).float() for k in v}
    return Fit(n=n, dims={k: v[k].numel() for k in v}, lam=lam, sum_sq=sum_sq, r=r,
               v={k: t.float() for k, t in v.items()}, reread=reread)


def fit_in_memory(model, val: Iterable[tuple[Batch, torch.Tensor]], fit_batches: list[Batch],
                  mode: str = "auto", series: SeriesSums | None = None, **kw) -> Fit:
    """The whole fit on batches held in memory (tests, benchmarks); the step streams shards instead.
    As the step does, pass 2 reruns the model on the samples with a remainder; see fit_and_score_in_memory.
    `series`: the (empty) pass-1 sums to use, e.g. with other settings."""
    v = _mean_gradient(model, val, **kw)
    series = SeriesSums(model) if series is None else series
    stats, ws = SampleStats(), Workspace()
    for batch in fit_batches:
        stats.extend(pass1_batch(model, batch, v, series, ws, mode, **kw)[0])

    def reread(batch_index: int, rows: torch.Tensor) -> BatchGrads:
        return BatchGrads(model, fit_batches[batch_index].select(rows), workspace=ws, **kw)

    return _fit_from_stats(v, stats, series, [b.input_ids.shape[0] for b in fit_batches], reread)


def fit_and_score_in_memory(model, val: Iterable[tuple[Batch, torch.Tensor]], batches: list[Batch],
                            mode: str = "auto", **kw) -> tuple[Fit, torch.Tensor]:
    """fit_in_memory(batches) and utilities(batches) at once, running the model once per batch.

    Each batch's `BatchGrads` is built once, in pass 1, and kept without its (N, V) residual: about tokens x 4
    hidden floats (final hidden states, embedding-output gradients and their per-token sums), plus, up to
    KEEP_IN_MEMORY_ELEMENTS in all, the per-sample output-layer gradients that pass 1 built whole for their
    norms (V x H floats a sample: 2 GiB for 1024 samples of the demo proxy; dattri keeps both layers' n
    per-sample gradients). Pass 2 (the remainders; usually none) and pass 3 (r . g_i, by `dots`) read the kept
    gradients, and recompute the residual from the kept hidden states (one (N, H) x (H, V) product and a
    softmax) only for the samples without one: no forward or backward through the body. For small n
    (benchmarks, tests): the streamed step (`automixer score`) cannot keep the corpus's states, and
    fit_in_memory + utilities is what it computes. Returns the fit and the utilities in input order (fp32).
    """
    v = _mean_gradient(model, val, **kw)
    series, stats, ws, kept = SeriesSums(model), SampleStats(), Workspace(), []
    kept_elements = 0
    for batch in batches:
        keep = Workspace() if kept_elements < KEEP_IN_MEMORY_ELEMENTS else None  # its own: not reused
        st, bg = pass1_batch(model, batch, v, series, ws, mode, keep=keep, **kw)
        kept_elements += bg.kept_elements()
        stats.extend(st)
        bg.release_residual()
        kept.append(bg)
    fit = _fit_from_stats(v, stats, series, [bg.B for bg in kept], lambda i, rows: _Rows(kept[i], rows))
    return fit, _utilities_of(kept, fit)


class _Rows:
    """A kept BatchGrads seen through `accumulate` for some of its samples (pass 2 in memory)."""

    def __init__(self, bg: BatchGrads, rows: torch.Tensor):
        self.bg, self.rows = bg, rows

    def accumulate(self, coeff: torch.Tensor, acc: dict[str, torch.Tensor]) -> None:
        full = torch.zeros(self.bg.B, dtype=coeff.dtype, device=coeff.device)
        full[self.rows] = coeff
        self.bg.accumulate(full, acc)  # samples with a zero coefficient cost nothing


def _mean_gradient(model, val: Iterable[tuple[Batch, torch.Tensor]], **kw) -> dict[str, torch.Tensor]:
    return {k: t.float() for k, t in weighted_gradient_sum(model, val, **kw).items()}


def _fit_from_stats(v: dict[str, torch.Tensor], stats: SampleStats, series: SeriesSums, sizes: list[int],
                    reread) -> Fit:
    """lambda and sum_i c_i g_i from pass 1's series sums, plus pass 2: `reread(batch, rows)` gives the gradients
    of those samples (a bool mask) of fit batch number `batch` (sizes: the batches' sizes)."""
    lam = series.damping()
    c_sum, rem, start, count = series.combine(lam), series.remainders(stats, lam), 0, 0
    for i, size in enumerate(sizes):
        part = {k: r[start:start + size] for k, r in rem.items()}
        start += size
        rows = torch.stack([r != 0 for r in part.values()]).any(0)
        if bool(rows.any()):
            bg = reread(i, rows)
            for k in c_sum:  # each layer has its own coefficients
                bg.accumulate(part[k][rows], {k: c_sum[k]})
            count += int(rows.sum())
    return finish(v, c_sum, series.n, lam, series.sum_sq, count)


def utilities(model, batches: Iterable[Batch], fit: Fit, **kw) -> torch.Tensor:
    """Scoring: u(x) = sum_l r_l . g_l(x) for every sample, in input order (fp32)."""
    project, ws = tuple(t for k, t in fit.r.items() if k != "embed"), Workspace()
    return _utilities_of((BatchGrads(model, batch, project=project, workspace=ws, **kw) for batch in batches), fit)


def _utilities_of(grads: Iterable[BatchGrads], fit: Fit) -> torch.Tensor:
    out = [sum(bg.dots(fit.r).values()) for bg in grads]
    return torch.cat(out) if out else torch.zeros(0)
