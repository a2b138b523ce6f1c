"""DataInf with several right-hand sides: one fit, every target task's r, in the same passes.

DataInf's damping lambda_l depends only on the fit samples' gradients, and for a fixed lambda
r_l is linear in the validation gradient v_l:

    c_itl = (v_tl . g_il) / (lambda_l + ||g_il||^2)
    r_tl  = (v_tl - (1/n) sum_i c_itl g_il) / lambda_l

so T tasks share the model's forward and backward passes, the norms and lambda; each extra
task costs one more dot per sample (formed in the same matmul as the backward through the
output layer, `BatchGrads(project=...)`), one more row of the weighted sums, and one more dot
per scored document. The fit reads its samples twice (pass 1: norms and dots -> lambda and
the exact coefficients; pass 2: the weighted sums): exact coefficients, no series, because
the fit sets here are small (a per-group sample) or read once more at little extra cost.
utility_t(x) = sum_l r_tl . g_l(x) has the project's sign: positive is helpful (it lowers task
t's validation loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

from automixer_ops.errors import AutomixerError
from automixer_ops.influence.datainf import damping, weighted_gradient_sum, zeros_like_layers
from automixer_ops.influence.grads import EMBED, Batch, BatchGrads, Workspace


@dataclass
class MultiFit:
    """r and v per task (layer-shaped, fp32), the shared lambda, and what reproduces them."""

    tasks: list[str]
    n: int
    dims: dict[str, int]
    lam: dict[str, float]
    sum_sq: dict[str, float]
    r: dict[str, dict[str, torch.Tensor]]
    v: dict[str, dict[str, torch.Tensor]]


def _projected(mats: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """The output-layer parts of several layer dicts: BatchGrads forms their dots in its backward matmul."""
    return tuple(m for d in mats for k, m in d.items() if k != EMBED)


def multi_task_fit(model, val: Mapping[str, Iterable[tuple[Batch, torch.Tensor]]],
                   fit_batches: Callable[[], Iterable[Batch]], mode: str = "auto", **kw) -> MultiFit:
    """DataInf's fit for every task of `val` (task -> its validation batches with averaging weights) over the
    fit samples `fit_batches()` yields (called twice: the same batches in the same order each time)."""
    tasks = list(val)
    if not tasks:
        raise AutomixerError("group influence: no target task to fit")
    v = {t: {k: m.float() for k, m in weighted_gradient_sum(model, val[t], **kw).items()} for t in tasks}
    project = _projected(v.values())

    # Pass 1: norms (shared) and one dot per task, per sample and layer.
    sq: dict[str, list[torch.Tensor]] = {}
    dots: dict[str, dict[str, list[torch.Tensor]]] = {t: {} for t in tasks}
    ws = Workspace()
    for batch in fit_batches():
        bg = BatchGrads(model, batch, project=project, workspace=ws, **kw)
        for k, x in bg.sq_norms(mode).items():
            sq.setdefault(k, []).append(x.double())
        for t in tasks:
            for k, x in bg.dots(v[t]).items():
                dots[t].setdefault(k, []).append(x.double())
    if not sq:
        raise AutomixerError("group influence: the fit set is empty")
    b = {k: torch.cat(x) for k, x in sq.items()}
    a = {t: {k: torch.cat(x) for k, x in d.items()} for t, d in dots.items()}
    bad = sorted({int(i) for x in [*b.values(), *(y for d in a.values() for y in d.values())]
                  for i in (~torch.isfinite(x)).nonzero()[:, 0].tolist()})
    if bad:
        raise AutomixerError(f"group influence: the gradient of fit sample(s) {bad[:5]} (in fit order) is NaN or "
                             "infinite; check those documents and the checkpoint")
    n = len(next(iter(b.values())))
    dims = {k: m.numel() for k, m in v[tasks[0]].items()}
    sum_sq = {k: float(x.sum()) for k, x in b.items()}
    lam = damping(sum_sq, n, dims)
    if any(x <= 0 for x in lam.values()):
        raise AutomixerError("group influence: every fit gradient is zero; nothing to fit")

    # Pass 2: sum_i c_itl g_il, the T tasks as the rows of one weighted sum per layer.
    coeff = {k: torch.stack([a[t][k] / (lam[k] + b[k]) for t in tasks]) for k in b}  # (T, n) fp64
    acc = {k: torch.zeros((len(tasks), *m.shape), dtype=torch.float64, device=m.device)
           for k, m in zeros_like_layers(model).items()}
    start = 0
    for batch in fit_batches():
        bg = BatchGrads(model, batch, workspace=ws, **kw)
        for k in acc:
            bg.accumulate(coeff[k][:, start:start + bg.B], {k: acc[k]})
        start += bg.B
    if start != n:
        raise AutomixerError(f"group influence: the fit batches changed between passes ({n} then {start} samples)")
    r = {t: {k: ((v[t][k].double() - acc[k][i] / n) / lam[k]).float() for k in acc} for i, t in enumerate(tasks)}
    return MultiFit(tasks=tasks, n=n, dims=dims, lam=lam, sum_sq=sum_sq, r=r, v=v)


def multi_task_utilities(model, batches: Iterable[Batch], fit: MultiFit, **kw) -> torch.Tensor:
    """(documents, tasks): utility_t(x) = sum_l r_tl . g_l(x), in input order (fp32)."""
    project, ws, out = _projected(fit.r.values()), Workspace(), []
    for batch in batches:
        bg = BatchGrads(model, batch, project=project, workspace=ws, **kw)
        out.append(torch.stack([sum(bg.dots(fit.r[t]).values()) for t in fit.tasks], dim=1))
    return torch.cat(out) if out else torch.zeros((0, len(fit.tasks)))
