"""Group Influence: the multi-task DataInf fit equals separate per-task fits and the literal per-sample
reference, and a group's influence is r . (its token-weighted gradient sum)."""

from __future__ import annotations

import pytest
import torch

from automixer_ops.influence.batching import make_batch
from automixer_ops.influence.datainf import fit_in_memory, utilities
from automixer_ops.tikmix.multitask import multi_task_fit, multi_task_utilities
from test_influence import random_samples, reference, tiny_llama

FIT = random_samples(61, [5, 9, 33, 2, 12, 8, 3, 21, 17, 6, 14, 4], seed=1)
# Three tasks with their own validation pairs (context not scored) and averaging weights.
TASKS = {"a": (random_samples(61, [7, 12, 6], seed=2), [4, 6, 2]),
         "b": (random_samples(61, [15, 9], seed=3), [14, 3]),
         "c": (random_samples(61, [8, 8, 11, 5], seed=4), [2, 5, 7, 1])}


def _val(seqs, firsts):
    w = torch.full((len(seqs),), 1.0 / len(seqs))
    return [(make_batch(seqs, firsts), w)]


def _fit_batches(size=5):
    return lambda: [make_batch([FIT[i] for i in idx], [1] * len(idx))
                    for idx in [list(range(i, min(i + size, len(FIT)))) for i in range(0, len(FIT), size)]]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_multi_task_fit_equals_one_fit_per_task_and_the_literal_reference(tied):
    model = tiny_llama(tied)
    val = {t: _val(*TASKS[t]) for t in TASKS}
    multi = multi_task_fit(model, val, _fit_batches())
    u_multi = multi_task_utilities(model, _fit_batches(4)(), multi)
    assert u_multi.shape == (len(FIT), 3)
    for i, t in enumerate(TASKS):
        single = fit_in_memory(model, val[t], _fit_batches()())
        assert multi.lam == pytest.approx(single.lam, rel=1e-12)  # lambda does not depend on the task
        for k in single.r:
            scale = single.r[k].abs().max()
            assert (multi.r[t][k] - single.r[k]).abs().max() <= 1e-4 * scale, (t, k)
        u_single = utilities(model, _fit_batches(4)(), single)
        assert (u_multi[:, i] - u_single).abs().max() <= 1e-4 * u_single.abs().max()
        seqs, firsts = TASKS[t]
        lam_ref, _, u_ref = reference(tiny_llama(tied), FIT, seqs, firsts, [1 / len(seqs)] * len(seqs))
        assert list(multi.lam.values()) == pytest.approx(lam_ref, rel=1e-5)
        assert u_multi[:, i].double() == pytest.approx(u_ref, rel=1e-3, abs=1e-4 * float(u_ref.abs().max()))


def test_group_influence_is_r_dot_the_groups_token_weighted_gradient_sum():
    """GI_g = sum_{x in g} n_x u(x) / sum n_x, and u(x) = r . g(x): so GI_g = r . (sum_x n_x g(x) / sum n_x),
    with the gradients from per-sample autograd (the definition, not the batched machinery)."""
    model = tiny_llama(False)
    val = {t: _val(*TASKS[t]) for t in ("a", "b")}
    fit = multi_task_fit(model, val, _fit_batches())
    u = multi_task_utilities(model, _fit_batches()(), fit)
    group = [0, 2, 3, 7, 10]
    n_tokens = torch.tensor([len(FIT[i]) * 3.0 for i in group])  # full documents are longer than the window

    params = {"embed": model.get_input_embeddings().weight, "output": model.get_output_embeddings().weight}

    def grad(seq):
        ids = torch.tensor([seq])
        logits = model(input_ids=ids).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    grads = [grad(FIT[i]) for i in group]
    pooled = {k: sum(w * g[k] for w, g in zip(n_tokens, grads)) / n_tokens.sum() for k in params}
    for j, t in enumerate(fit.tasks):
        gi = float((n_tokens * u[group, j]).sum() / n_tokens.sum())
        direct = float(sum((fit.r[t][k] * pooled[k]).sum() for k in params))
        assert gi == pytest.approx(direct, rel=1e-4, abs=1e-6 * float(u.abs().max()))


def test_the_fit_set_must_not_change_between_passes():
    from automixer_ops.errors import AutomixerError

    model = tiny_llama(False)
    calls = iter([_fit_batches()(), _fit_batches()()[:1]])
    with pytest.raises(AutomixerError, match="changed between passes"):
        multi_task_fit(model, {"a": _val(*TASKS["a"])}, lambda: next(calls))
