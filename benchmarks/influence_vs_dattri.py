"""Our DataInf (streamed passes, and in memory) against dattri 0.3's IFAttributorDataInf: speed, memory, agreement.

Both sides score the same n training samples against the same test samples with the same
model, in the same process, on the gradients of the same two layers (input embedding and
output layer), with the same losses:
  train sample   mean next-token CE over its tokens (EOS + the document's first seq_len - 1
                 tokens, right-padded; padding carries no loss)
  test sample    mean CE of its second half given its first half (a held-out document);
                 v = the mean test gradient
Wall time = fit + scoring of the n samples (tokenization excluded on both sides):
  ours, streamed passes (as `automixer score`)
          fit_in_memory (v, pass 1 with its series sums, pass 2 for the samples the series
          does not give exactly) + utilities (pass 3), batches by length_batches: the model
          runs over every batch in passes 1 and 3 (and over the reread samples in pass 2),
          nothing is kept between passes
  ours, in memory (like dattri, which keeps all n per-sample gradients)
          fit_and_score_in_memory: v, then the model runs once per batch (pass 1) and every
          batch's hidden states and embedding-output gradients are kept (about tokens x 4
          hidden floats), with the per-sample output-layer gradients pass 1 built for their
          norms (V x H floats a sample, up to 2 GiB); passes 2 and 3 read those, no model run
  dattri  attributor.cache(train) + attributor.attribute(train, test), then the mean over
          the test columns (every DataInf quantity is linear in v, so this equals scoring
          against the mean test gradient)
Sign: dattri's score is g_train . (DataInf-inverse of g_test), larger = more helpful, the
same convention as our utility (= -DataInf influence); the script checks the sign. The
in-memory utilities must equal the streamed ones (asserted) and are compared with dattri too.
Memory: the growth of the process's peak RSS during one call (VmHWM reset through
/proc/self/clear_refs before it, after gc and malloc_trim), for each of the three.

dattri 0.3 fixed in a subclass (DataInfPerLayer below), and said so in the results:
  1. the layer split: IFAttributorDataInf._get_layer_wise_reps splits the selected
     parameters by the whole model's layer map (get_param without layer_name), so the
     output layer's gradient is cut into pieces sized like the body's layers; the subclass
     asks for the map of the selected layers only;
  2. damping: one `regularization` for every layer (default 0.0, which divides by zero;
     None falls back to 0.1); the subclass uses DESIGN §2's per-layer
     lambda_l = 0.1 / (n d_l) * sum_i ||g_il||^2 from the cached training gradients.
Stock dattri (regularization=0.1, whole-model split) is run once at the smallest n for
reference.

dattri's calls run under torch.no_grad() (torch.func.grad still differentiates inside):
otherwise each cached gradient keeps an autograd graph back to the model's parameters and
n = 1024 exhausted this machine's 24 GiB.

Models: dattri's per-sample gradients (vmap over a flattened copy of every parameter) cost
about 0.2 s per sample for the demo proxy (preset tiny, vocab 8192) on this shared 2-core
CPU, computed twice (cache and attribute), and attribute() redoes the O(n) test transform
once per training batch (only 64 samples fit at vocab 8192), so dattri's time grows ~n^2:
about 20 minutes at n = 1024. So the first rows use preset `tiny` with a 1024-token
byte-level BPE trained here on the corpus, the model trained here for --train-steps steps
(AdamW, packed windows of the corpus, seed 0); the demo proxy itself (runs/demo's latest
checkpoint; random init on a fresh clone) runs at --demo-n samples (256 and 1024).
seq_len 128 (EOS + the document's first 127 tokens).

Environment (dattri is NOT installed in the project's .venv):

    python3.11 -m venv .bench-dattri
    .bench-dattri/bin/python -m pip install torch==2.13.0
    .bench-dattri/bin/python -m pip install -c constraints.txt -e .
    .bench-dattri/bin/python -m pip install -c constraints.txt dattri==0.3.0
    # dattri 0.3.0 requires numpy, scipy, pyyaml, tqdm, pretty_midi (no torch pin)

    .bench-dattri/bin/python benchmarks/influence_vs_dattri.py --out benchmarks/results/influence_vs_dattri.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's per-batch progress bars
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see influence_cost.py

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from influence_cost import (ROOT, corpus_docs, corpus_token_ids, demo_run, emit, load_line, load_model,  # noqa: E402
                            load_tokenizer, machine_line, packed_windows)

LAYERS = ["model.embed_tokens.weight", "lm_head.weight"]


def peak_rss_growth(fn):
    """fn() and the growth of the process's peak RSS during it in GiB (None where /proc cannot tell)."""
    def status(field: str) -> float:
        with open("/proc/self/status") as f:
            return next(float(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        start = status("VmRSS")
    except OSError:
        return fn(), None
    out = fn()
    return out, status("VmHWM") - start


# ------------------------------------------------------------------ dattri, fixed


def dattri_classes():
    from dattri.algorithm.influence_function import IFAttributorDataInf

    class DataInfPerLayer(IFAttributorDataInf):
        """IFAttributorDataInf with the selected layers' own split and DESIGN §2's per-layer damping."""

        def cache(self, full_train_dataloader) -> None:
            super().cache(full_train_dataloader)
            self.layer_lambdas = {}
            for ckpt, reps in self._cached_train_reps.items():
                parts = self._get_layer_wise_reps(ckpt, reps)
                n = reps.shape[0]
                self.layer_lambdas[ckpt] = [0.1 * float(p.double().pow(2).sum()) / (n * p.shape[1]) for p in parts]

        def _get_layer_wise_reps(self, ckpt_idx, query):
            # Fix 1: the layer map of the selected parameters (dattri passes no layer_name here).
            model_params, param_layer_map = self.task.get_param(ckpt_idx, layer_name=self.layer_name,
                                                                layer_split=True)
            split_index = [0] * (param_layer_map[-1] + 1)
            for idx, layer_index in enumerate(param_layer_map):
                split_index[layer_index] += model_params[idx].shape[0]
            assert sum(split_index) == query.shape[1], (split_index, query.shape)
            return tuple(query.split(split_index, dim=1))

        def transform_test_rep(self, ckpt_idx, test_rep):
            # dattri's own body, with fix 2: reg = lambda_l of the layer instead of one value for all.
            def _transform_single_test_rep(v, grad, regularization):
                grad = grad.unsqueeze(-1)
                coef = (v @ grad) / (regularization + torch.norm(grad) ** 2)
                return (v - coef @ grad.T) / regularization

            test_rep_layers = self._get_layer_wise_reps(ckpt_idx, test_rep)
            cached_train_rep_layers = self._get_layer_wise_reps(ckpt_idx, self._cached_train_reps[ckpt_idx])
            transformed = []
            batch_size = test_rep.shape[0]
            for layer in range(len(cached_train_rep_layers)):
                grad_layer = cached_train_rep_layers[layer]
                length = grad_layer.shape[0]
                running = torch.zeros(test_rep_layers[layer].shape, device=test_rep_layers[layer].device)
                reg = self.layer_lambdas[ckpt_idx][layer]
                for batch in grad_layer.split(batch_size, dim=0):
                    contribution = torch.func.vmap(
                        lambda grad, layer=layer, reg=reg: _transform_single_test_rep(test_rep_layers[layer], grad,
                                                                                      reg))(batch)
                    running += contribution.sum(dim=0)
                running /= length
                transformed.append(running)
            return torch.cat(transformed, dim=1)

    return IFAttributorDataInf, DataInfPerLayer


def run_dattri(model, train, test, batch_size: int, fixed: bool) -> tuple[np.ndarray, dict]:
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    stock_cls, fixed_cls = dattri_classes()

    def loss(params, data):  # one sample: (1, T) ids and (1, T) loss weights (make_batch's)
        ids, weight = data
        logits = torch.func.functional_call(model, params, (ids,)).logits[0]
        nll = -torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        return (nll * weight[0, :-1]).sum()

    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    att = (fixed_cls(task, layer_name=LAYERS, device="cpu") if fixed
           else stock_cls(task, layer_name=LAYERS, device="cpu", regularization=0.1))
    tr = DataLoader(TensorDataset(*train), batch_size=batch_size, shuffle=False)
    te = DataLoader(TensorDataset(*test), batch_size=len(test[0]), shuffle=False)
    # Under no_grad: torch.func.grad still differentiates inside, but the results no longer carry an autograd
    # graph back to the model's parameters (dattri copies them into its flattened vector), which otherwise
    # keeps every cached batch's graph alive: 24 GB and the OOM killer at n = 1024 here.
    def timed():
        with torch.no_grad():
            t0 = time.perf_counter()
            att.cache(tr)
            t1 = time.perf_counter()
            scores = att.attribute(tr, te)
            t2 = time.perf_counter()
        return scores, {"cache_s": t1 - t0, "attribute_s": t2 - t1, "wall_s": t2 - t0}

    (scores, info), info["peak_gib"] = peak_rss_growth(timed)
    if fixed:
        info["lambda"] = att.layer_lambdas[0]
    return scores.detach().double().mean(1).numpy(), info


# ------------------------------------------------------------------ ours


def run_ours(model, train_seqs, test_seqs, test_firsts, pad: int, in_memory: bool) -> tuple[np.ndarray, dict]:
    """in_memory False: the streamed passes (as `automixer score`); True: fit_and_score_in_memory."""
    from automixer_ops.influence.batching import length_batches, make_batch
    from automixer_ops.influence.datainf import fit_and_score_in_memory, fit_in_memory, utilities

    def timed():
        t0 = time.perf_counter()
        val = [(make_batch(test_seqs, test_firsts, pad), torch.full((len(test_seqs),), 1.0 / len(test_seqs)))]
        groups = list(length_batches([len(s) for s in train_seqs], batch_tokens=8192))
        batches = [make_batch([train_seqs[i] for i in g], [1] * len(g), pad) for g in groups]
        if in_memory:
            fit, u = fit_and_score_in_memory(model, val, batches)
        else:
            fit = fit_in_memory(model, val, batches)
            u = utilities(model, batches, fit)
        return groups, fit, u, time.perf_counter() - t0

    (groups, fit, u, wall), peak = peak_rss_growth(timed)
    out = np.empty(len(train_seqs))
    out[[i for g in groups for i in g]] = u.double().numpy()
    return out, {"wall_s": wall, "peak_gib": peak, "lambda": [fit.lam["embed"], fit.lam["output"]],
                 "reread": fit.reread}


# ------------------------------------------------------------------ set-up


def small_vocab_model(texts: list[str], vocab: int, steps: int, seq_len: int):
    from transformers import LlamaForCausalLM

    from automixer_ops.config import TokenizerSection
    from automixer_ops.proxy import model_config
    from automixer_ops.tokenizer import train_bpe

    tok = train_bpe(texts, TokenizerSection(vocab_size=vocab, model_max_length=512))
    ids = [e.ids for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config("tiny", len(tok), 512, tok)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    windows = packed_windows(ids, tok.eos_token_id, seq_len, steps * 16, seed=1) if steps else None
    loss = float("nan")
    for s in range(steps):
        x = windows[s * 16:(s + 1) * 16]
        out = model(input_ids=x, labels=x).loss
        out.backward()
        opt.step()
        opt.zero_grad()
        loss = out.item()
    return tok, ids, model.eval(), loss


def padded(seqs, firsts, width: int, pad: int):
    """make_batch's ids and loss weights, right-padded to a fixed width (dattri vmaps over equal shapes)."""
    from automixer_ops.influence.batching import make_batch

    b = make_batch(seqs, firsts, pad)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    w = torch.zeros((len(seqs), width))
    ids[:, :b.input_ids.shape[1]] = b.input_ids
    w[:, :b.loss_weight.shape[1]] = b.loss_weight
    return ids, w


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    from scipy.stats import pearsonr, spearmanr

    rel = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    return float(pearsonr(a, b)[0]), float(spearmanr(a, b)[0]), rel


def compare(label: str, tok, ids: list[list[int]], model, ns: list[int], max_batch: int, args,
            stock: bool) -> list[dict]:
    """Both sides on the first n of one seeded selection of documents, for each n; ours interleaved around dattri."""
    pad, eos, L, k = tok.pad_token_id, tok.eos_token_id, args.seq_len, args.test
    order = [int(i) for i in np.random.default_rng(0).permutation(len(ids)) if args.lengths[i] >= 100]
    test_seqs = [[eos] + ids[i][:L - 1] for i in order[:k]]
    test_firsts = [len(s) // 2 for s in test_seqs]
    train_all = [[eos] + ids[i][:L - 1] for i in order[k:k + max(ns)]]
    model.requires_grad_(False)  # ours: as the scorer runs it
    theirs_model = type(model)(model.config).eval()
    theirs_model.load_state_dict(model.state_dict())
    theirs_model.requires_grad_(True)
    test_t = padded(test_seqs, test_firsts, L, pad)

    rows = []
    for n in ns:
        train_seqs = train_all[:n]
        train_t = padded(train_seqs, [1] * n, L, pad)
        batch = min(n, max_batch)
        ours, mem, theirs = [], [], []  # info dicts per run: streamed, in memory, dattri
        for in_memory in (False, True):  # warmup
            run_ours(model, train_seqs, test_seqs, test_firsts, pad, in_memory)
        for rep in range(max(args.ours_repeats, args.dattri_repeats)):  # interleaved
            if rep < args.ours_repeats:
                u, info = run_ours(model, train_seqs, test_seqs, test_firsts, pad, in_memory=False)
                ours.append(info)
                um, minfo = run_ours(model, train_seqs, test_seqs, test_firsts, pad, in_memory=True)
                mem.append(minfo)
            if rep < args.dattri_repeats:
                d, dinfo = run_dattri(theirs_model, train_t, test_t, batch, fixed=True)
                theirs.append(dinfo)
            print(f"{label} n={n} round {rep + 1}: ours streamed {ours[-1]['wall_s']:.2f} s, in memory "
                  f"{mem[-1]['wall_s']:.2f} s" +
                  (f", dattri {theirs[-1]['wall_s']:.1f} s (cache {theirs[-1]['cache_s']:.1f} + attribute "
                   f"{theirs[-1]['attribute_s']:.1f})" if rep < args.dattri_repeats else ""), flush=True)
        same = float(np.max(np.abs(um - u)) / np.max(np.abs(u)))
        assert same <= 1e-4 and np.allclose(minfo["lambda"], info["lambda"], rtol=1e-5), (same, minfo, info)
        pear, spear, rel = agreement(u, d)
        row = {"model": label, "n": n, "batch": batch, "ours": [x["wall_s"] for x in ours],
               "mem": [x["wall_s"] for x in mem], "dattri": theirs, "pearson": pear, "spearman": spear, "rel": rel,
               "mem_pearson": agreement(um, d)[0], "mem_rel": agreement(um, d)[2], "mem_vs_streamed": same,
               "peak": [max(x["peak_gib"] for x in runs) if all(x["peak_gib"] is not None for x in runs) else None
                        for runs in (ours, mem, theirs)],
               "lam_ours": info["lambda"], "lam_dattri": dinfo["lambda"], "neg_pearson": agreement(u, -d)[0],
               "reread": info["reread"]}
        if stock and n == ns[0]:
            s, sinfo = run_dattri(theirs_model, train_t, test_t, batch, fixed=False)
            finite = bool(np.isfinite(s).all())
            sp, ss, _ = agreement(u, s) if finite else (float("nan"),) * 3
            row["stock"] = {"pearson": sp, "spearman": ss, "wall_s": sinfo["wall_s"], "finite": finite}
        rows.append(row)
        print({k2: v for k2, v in row.items()}, flush=True)
    return rows


def scaling_paragraph(rows: list[dict]) -> str:
    """How the speed-up moves with n, per model, from the measured rows (smallest to largest n)."""
    parts = []
    for label in dict.fromkeys(r["model"] for r in rows):
        rs = sorted((r for r in rows if r["model"] == label), key=lambda r: r["n"])
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        med = lambda r, k: statistics.median(x[k] for x in r["dattri"])  # noqa: E731
        ours = lambda r, k="ours": statistics.median(r[k])  # noqa: E731
        parts.append(
            f"{label}, n = {a['n']:,} → {b['n']:,} (×{b['n'] / a['n']:g}; dattri batch b = {a['batch']} → "
            f"{b['batch']}, {-(-a['n'] // a['batch'])} → {-(-b['n'] // b['batch'])} training batches): ours "
            f"streamed {ours(a):.2f} → {ours(b):.2f} s (×{ours(b) / ours(a):.1f}), in memory "
            f"{ours(a, 'mem'):.2f} → {ours(b, 'mem'):.2f} s (×{ours(b, 'mem') / ours(a, 'mem'):.1f}); dattri "
            f"{med(a, 'wall_s'):.0f} → {med(b, 'wall_s'):.0f} s (×{med(b, 'wall_s') / med(a, 'wall_s'):.1f}; "
            f"cache ×{med(b, 'cache_s') / med(a, 'cache_s'):.1f}, attribute "
            f"×{med(b, 'attribute_s') / med(a, 'attribute_s'):.1f}); speed-up streamed "
            f"{med(a, 'wall_s') / ours(a):.0f}× → {med(b, 'wall_s') / ours(b):.0f}×, in memory "
            f"{med(a, 'wall_s') / ours(a, 'mem'):.0f}× → {med(b, 'wall_s') / ours(b, 'mem'):.0f}×")
    return ("Scaling with n: ours, streamed, runs the model over the n samples twice (passes 1 and 3, after "
            "v; pass 2 reread none here), O(n); ours in memory runs it once and does pass 3 on the kept states, "
            "O(n). dattri's "
            "`cache()` computes the n training gradients once, O(n); its `attribute()` recomputes them, O(n), and "
            "once per training batch of b samples applies the DataInf transform of the test gradients against all "
            "n cached gradients, O(n) each: O(n²/b) in all. So the speed-up grows with n where that term is a "
            "large share of dattri's time: many training batches (small b, which memory forces at vocabulary "
            "8192) and large layer gradients; with few batches and small gradients both sides grow about "
            "linearly. Measured (one dattri run per row, on a shared machine): " + "; ".join(parts) + ".")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="256,1024", help="fit/scored samples, small-vocabulary model")
    ap.add_argument("--demo-n", default="256,1024", help="fit/scored samples, the demo proxy (vocab 8192); '' skips")
    ap.add_argument("--test", type=int, default=4, help="test (validation) samples")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--dattri-batch", type=int, default=256, help="dattri dataloader batch (cache and attribute)")
    ap.add_argument("--demo-dattri-batch", type=int, default=64, help="the same for the demo proxy (8x the memory "
                    "per sample)")
    ap.add_argument("--ours-repeats", type=int, default=5)
    ap.add_argument("--dattri-repeats", type=int, default=1)
    ap.add_argument("--no-stock", action="store_true", help="skip the stock-dattri reference run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers
    transformers.utils.logging.disable_progress_bar()

    import dattri  # noqa: F401
    from importlib.metadata import version

    load0, t_start = os.getloadavg(), time.perf_counter()
    rows, models = [], {}
    with demo_run() as (run, ckpt):
        docs = corpus_docs(run)
        texts = [d["text"] for d in docs]
        args.lengths = [len(t) for t in texts]  # documents of >= 100 characters (tokenizer-independent)
        if args.n:
            tok, ids, model, train_loss = small_vocab_model(texts, args.vocab, args.train_steps, args.seq_len)
            small = f"tiny, vocab {len(tok)} (trained here, {args.train_steps} steps)"
            models[small] = (f"preset `tiny` (hidden 64, 2 layers) with a {len(tok)}-token byte-level BPE trained "
                             f"here on the corpus, then trained {args.train_steps} steps here (AdamW, packed 16 x "
                             f"{args.seq_len} windows, seed 0; last loss {train_loss:.2f})")
            print(f"model: {small}, last loss {train_loss:.3f}", flush=True)
            rows += compare(small, tok, ids, model, [int(x) for x in args.n.split(",")], args.dattri_batch, args,
                            not args.no_stock)
        if args.demo_n:
            tok = load_tokenizer(run)
            demo = f"demo proxy, vocab {len(tok)}" + (f" ({ckpt.name})" if ckpt else " (random init)")
            models[demo] = ("the demo's `tiny` proxy as `automixer train-proxy` made it "
                            f"(`{ckpt.relative_to(ROOT)}`)" if ckpt else "preset `tiny`, random init (seed 0)") + \
                f" with the demo's {len(tok)}-token tokenizer"
            rows += compare(demo, tok, corpus_token_ids(tok, texts), load_model("tiny", tok, ckpt).eval(),
                            [int(x) for x in args.demo_n.split(",")], args.demo_dattri_batch, args, False)
    load1, total = os.getloadavg(), time.perf_counter() - t_start

    cmd = ".bench-dattri/bin/python benchmarks/influence_vs_dattri.py"
    for flag, default in (("n", "256,1024"), ("demo_n", "256,1024"), ("test", 4)):
        if getattr(args, flag) != default:
            cmd += f" --{flag.replace('_', '-')} '{getattr(args, flag)}'"
    cmd += " --out benchmarks/results/influence_vs_dattri.md"
    lines = [
        "# DataInf: automixer vs dattri 0.3 (IFAttributorDataInf)",
        "",
        machine_line() + f", dattri {version('dattri')}.",
        load_line(load0, load1) + ".",
        "Models: " + "; ".join(f"**{k}**: {v}" for k, v in models.items()) + ". fp32. Layers: input embedding and "
        "output layer. Samples: EOS + the first "
        f"{args.seq_len - 1} tokens of real corpus documents (seeded shuffle of the documents of >= 100 "
        f"characters); test set: {args.test} other documents, loss on their second half given the first. "
        f"Whole run: {total:.0f} s.",
        "",
        f"Reproduce (the environment is described at the top of the script): `{cmd}`",
        "",
        "Two of ours per row. **Streamed** = ours as `automixer score` computes it (`fit_in_memory` + "
        "`utilities`): the model runs over every batch in pass 1 (norms, v·g and the series sums that give "
        "Σ c_i g_i without λ) and pass 3 (scores), and in pass 2 over the samples whose coefficient the series "
        f"does not give to 1e-8 (here: {', '.join(str(r['reread']) for r in rows)} samples in the rows below); "
        "nothing is kept between passes, so its memory does not grow with n. **In memory** = "
        "`fit_and_score_in_memory`, keeping state between passes as dattri keeps all n per-sample gradients: "
        "the model runs once per batch and every batch's hidden states and embedding-output gradients (about "
        "tokens × 4 hidden fp32 values) are kept, with the per-sample output-layer gradients that pass 1 builds "
        "for their norms (V × H fp32 values a sample, up to 2 GiB in all); pass 3 reads them (no forward or "
        "backward through the body, no softmax). Its utilities equal the streamed ones (checked: max abs diff ÷ max abs "
        "≤ 1e-4, same λ); agreement with dattri is given for both. Peak memory = growth of the process's peak "
        "RSS during one call (the largest of the row's runs).",
        "",
        "| model | n | ours, streamed passes: fit + score (s) | ours, in memory: fit + score (s) | dattri: "
        "cache + attribute (s) | speed-up (dattri ÷ ours streamed) | speed-up (dattri ÷ ours in memory) | peak "
        "memory growth (GiB): streamed, in memory, dattri | Pearson (streamed; in memory) | Spearman | max abs "
        "diff ÷ max abs (streamed; in memory) | λ_embed, λ_output: ours | dattri subclass | dattri batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        mo, mm = statistics.median(r["ours"]), statistics.median(r["mem"])
        md = statistics.median(x["wall_s"] for x in r["dattri"])
        det = "; ".join(f"{x['cache_s']:.0f} + {x['attribute_s']:.0f}" for x in r["dattri"])
        runs = lambda ws: ", ".join(f"{x:.1f}" for x in ws)  # noqa: E731
        peak = ", ".join("?" if p is None else f"{p:.1f}" for p in r["peak"])
        lines.append(
            f"| {r['model']} | {r['n']:,} | {mo:.2f} ({runs(r['ours'])}) | {mm:.2f} ({runs(r['mem'])}) | {md:.0f} "
            f"({det}) | **{md / mo:,.0f}×** | **{md / mm:,.0f}×** | {peak} | {r['pearson']:.6f}; "
            f"{r['mem_pearson']:.6f} | {r['spearman']:.6f} | {r['rel']:.1e}; {r['mem_rel']:.1e} | "
            f"{r['lam_ours'][0]:.4e}, {r['lam_ours'][1]:.4e} | {r['lam_dattri'][0]:.4e}, {r['lam_dattri'][1]:.4e} | "
            f"{r['batch']} |")
    lines += ["", scaling_paragraph(rows), ""]
    for r in (r for r in rows if "stock" in r):
        s = r["stock"]
        lines.append(
            f"Stock `IFAttributorDataInf(regularization=0.1)` (one λ for all layers, layers split by the whole "
            f"model's map), {r['model']}, n = {r['n']:,}: " +
            (f"Pearson {s['pearson']:.4f}, Spearman {s['spearman']:.4f} against ours" if s["finite"]
             else "non-finite scores") + f", {s['wall_s']:.0f} s. (Its default `regularization=0.0` divides by "
            "zero; `None` falls back to 0.1.)")
    lines += [
        "",
        "Sign mapping: dattri's `attribute()` returns g_train · q with q = mean_i (v − c_i g_i) / λ (the DataInf "
        "inverse applied to the test gradient) **without** the minus sign of the influence function, so it is "
        "already our utility u = Σ_l r_l · g_l = −I(x) (positive lowers the test loss): "
        f"Pearson(ours, +dattri) = {rows[0]['pearson']:.4f}, Pearson(ours, −dattri) = {rows[0]['neg_pearson']:.4f}. "
        "dattri gives one column per test sample; every DataInf quantity is linear in v, so the mean of the "
        "columns is the score against the mean test gradient, which is what ours computes. Losses: mean "
        "next-token CE over a sample's tokens (make_batch's loss weights, handed to dattri's loss function as "
        "data; dattri runs the model without an attention mask, exact for right padding in a causal model).",
        "",
        "dattri 0.3.0 as run here: `DataInfPerLayer`, a subclass of `IFAttributorDataInf` (in this script) with "
        "two fixes: (1) `_get_layer_wise_reps` splits by the layer map of the selected parameters "
        "(`task.get_param(..., layer_name=self.layer_name, layer_split=True)`); dattri's own passes no "
        "`layer_name`, so the two selected layers' gradient is split by the whole model's layer map and the "
        "output layer is cut into pieces sized like the body's layers; (2) `transform_test_rep` uses DESIGN §2's "
        "per-layer λ_l = 0.1/(n d_l) Σ_i ‖g_il‖², computed in `cache()` from the cached training gradients, "
        "instead of one `regularization` for all layers. Everything else (per-sample gradients by vmap over a "
        "flattened copy of all parameters, the cache of all n gradients, `attribute()` recomputing the training "
        "gradients and the test transform, O(n) each, once per training batch) is dattri's; its dataloader batch "
        f"is min(n, {args.dattri_batch}) for the small-vocabulary model and min(n, {args.demo_dattri_batch}) for "
        "the demo proxy, about the largest that fits in memory here (fewer batches = fewer O(n) transforms). "
        "dattri's calls run under `torch.no_grad()` (its `torch.func.grad` still differentiates inside); without "
        "it every cached gradient keeps an autograd graph back to the model's parameters and n = 1024 ran out of "
        "this machine's 24 GiB. "
        "Ours runs as the scorer does: the model in eval mode with requires_grad off, batches of up to 8192 "
        "padded tokens grouped by length; streamed: v + pass 1 + pass 2 + pass 3, passes 1 and 3 running the "
        "model on every batch, pass 2 on the samples it rereads; in memory: v + pass 1 (keeping the batch "
        "states and output-layer gradients) + passes 2 and 3 on the kept states. Timings: median "
        f"of {args.ours_repeats} runs of each of ours (after one warmup each) and {args.dattri_repeats} of dattri "
        "per row, interleaved (ours' first runs before dattri's, the rest after); tokenization excluded on all "
        "sides.",
        "",
    ]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
