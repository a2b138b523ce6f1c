"""DataInf scorer: exactness against a literal per-sample reference, the step's contracts, behaviour."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from automixer_ops.config import load_config
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.influence.batching import length_batches, make_batch
from automixer_ops.influence.datainf import SeriesSums, fit_and_score_in_memory, fit_in_memory, utilities
from conftest import linked_scoring_run, piqa_pairs, write_valset

# ------------------------------------------------------------------ exactness


def tiny_llama(tied: bool, seed: int = 0, vocab: int = 61):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def reference(model, fit_seqs, val_seqs, val_firsts, val_weights):
    """DESIGN §2 written literally: one sample at a time through autograd, in fp64."""
    model = model.double()
    params = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings:
        params.append(model.get_output_embeddings().weight)

    def grad(seq, first):
        ids = torch.tensor([seq])
        logits = model(input_ids=ids).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[first - 1:-1], ids[0, first:])
        return torch.autograd.grad(loss, params)

    val = [grad(s, f) for s, f in zip(val_seqs, val_firsts)]
    v = [sum(w * g[l] for w, g in zip(val_weights, val)) for l in range(len(params))]
    G = [grad(s, 1) for s in fit_seqs]
    n, lam, r = len(G), [], []
    for l in range(len(params)):
        lam_l = 0.1 / (n * v[l].numel()) * sum((g[l] ** 2).sum() for g in G)
        c = [(v[l] * g[l]).sum() / (lam_l + (g[l] ** 2).sum()) for g in G]
        r.append((v[l] - sum(ci * g[l] for ci, g in zip(c, G)) / n) / lam_l)
        lam.append(float(lam_l))
    u = torch.stack([sum((r[l] * g[l]).sum() for l in range(len(params))) for g in G])
    return lam, r, u


def random_samples(vocab: int, lengths, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fit_and_utilities_match_the_per_sample_reference(tied):
    model = tiny_llama(tied)
    # Lengths from 2 (one predicted token) to 33: short rows take the Gram form, long rows the explicit one.
    fit_seqs = random_samples(61, [5, 9, 33, 2, 12, 8, 3, 21, 17, 6], seed=1)
    val_seqs = random_samples(61, [7, 12, 6, 15], seed=2)
    val_firsts, val_weights = [4, 6, 2, 14], [0.125, 0.125, 0.25, 0.5]  # contexts not scored, unequal weights
    lam_ref, r_ref, u_ref = reference(tiny_llama(tied), fit_seqs, val_seqs, val_firsts, val_weights)

    val = [(make_batch(val_seqs[:3], val_firsts[:3]), torch.tensor(val_weights[:3])),
           (make_batch(val_seqs[3:], val_firsts[3:]), torch.tensor(val_weights[3:]))]
    # sum_i c_i g_i: as the step makes it (series sums, then the samples whose bound fails: here, with layers of
    # 976 parameters, lambda/||g||^2 is ~1e-3 and most do), from the series alone (a relative error rho^2 in
    # each c_i), or from pass 2 alone (no sample in the series).
    series = {"step": {}, "series only": {"max_ratio": float("inf")}, "pass 2 only": {"defer_ratio": 0.0}}
    for (mode, size, how) in [(m, s, "step") for m in ("explicit", "ghost", "auto") for s in (1, 3, 10)] + [
            ("auto", 3, "series only"), ("auto", 3, "pass 2 only")]:
        # Padding patterns: input order (mixed lengths in a batch) and length-sorted batches.
        for groups in ([list(range(i, min(i + size, 10))) for i in range(0, 10, size)],
                       list(length_batches([len(s) for s in fit_seqs], batch_tokens=size * 33))):
            order = [i for grp in groups for i in grp]
            batches = [make_batch([fit_seqs[i] for i in grp], [1] * len(grp)) for grp in groups]
            fit = fit_in_memory(model, val, batches, mode=mode, series=SeriesSums(model, **series[how]))
            u = torch.empty(10, dtype=torch.float64)
            u[order] = utilities(model, batches, fit).double()
            where = f"{mode}, batch {size}, {how}"
            for l, name in enumerate(fit.lam):
                assert abs(fit.lam[name] - lam_ref[l]) <= 1e-4 * lam_ref[l], where
                err = (fit.r[name].double() - r_ref[l]).abs().max() / r_ref[l].abs().max()
                assert err <= 1e-4, (where, name, float(err))
            rel = (u - u_ref).abs() / u_ref.abs()
            assert float(rel.max()) <= 1e-4, (where, rel)
    assert list(fit.lam) == (["tied"] if tied else ["embed", "output"])


@pytest.mark.parametrize("keep", [None, 1, 0], ids=["kept", "first-batch-kept", "none-kept"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fit_and_score_in_memory_equals_the_streamed_passes(tied, keep, monkeypatch):
    """keep: the in-memory budget of kept output-layer gradients (default; 1 = only the first batch keeps its
    gradients; 0 = none, every dot from the recomputed residual)."""
    from automixer_ops.influence import datainf
    from automixer_ops.influence.grads import BatchGrads

    if keep is not None:
        monkeypatch.setattr(datainf, "KEEP_IN_MEMORY_ELEMENTS", keep)
    kept_rows, kept_dots = [], BatchGrads._kept_dots
    monkeypatch.setattr(BatchGrads, "_kept_dots", lambda bg, m: kept_rows.append(len(bg._kept)) or kept_dots(bg, m))
    model = tiny_llama(tied)
    fit_seqs = random_samples(61, [5, 9, 33, 2, 12, 8, 3, 21, 17, 6], seed=1)
    val_seqs = random_samples(61, [7, 12, 6, 15], seed=2)
    val = [(make_batch(val_seqs, [4, 6, 2, 14]), torch.tensor([0.125, 0.125, 0.25, 0.5]))]
    batches = [make_batch([fit_seqs[i] for i in grp], [1] * len(grp))
               for grp in length_batches([len(s) for s in fit_seqs], batch_tokens=2 * 33)]  # [33, 21], [17, 12, 9], ...
    fit = fit_in_memory(model, val, batches)
    u = utilities(model, batches, fit)
    kept_fit, kept_u = fit_and_score_in_memory(model, val, batches)
    assert list(kept_fit.lam) == list(fit.lam) and kept_fit.n == fit.n == 10
    for name in fit.lam:
        assert kept_fit.lam[name] == pytest.approx(fit.lam[name], rel=1e-5)
        torch.testing.assert_close(kept_fit.r[name], fit.r[name], rtol=1e-5, atol=1e-5 * float(fit.r[name].abs().max()))
    torch.testing.assert_close(kept_u, u, rtol=1e-5, atol=1e-5 * float(u.abs().max()))
    # Scored from kept gradients: the samples of length 33, 21 and 17, long enough to have theirs built whole for
    # their norms (the others take the Gram form); with budget 1, those of the first batch; with 0, none.
    assert kept_rows == {None: [2, 1], 1: [2], 0: []}[keep]
    # The kept states carry no autograd graph (the model's weights need no gradient here either).
    bg = BatchGrads(model.requires_grad_(True), batches[0])
    assert all(t.grad_fn is None and not t.requires_grad for t in vars(bg).values() if torch.is_tensor(t))


def test_padding_and_batch_composition_do_not_change_a_samples_statistics():
    from automixer_ops.influence.grads import BatchGrads

    model = tiny_llama(False)
    seqs = random_samples(61, [4, 30, 11], seed=3)
    v = {k: torch.randn(w.shape) for k, w in [("embed", model.get_input_embeddings().weight),
                                              ("output", model.get_output_embeddings().weight)]}
    together = BatchGrads(model, make_batch(seqs, [1, 1, 1]))
    for i, s in enumerate(seqs):
        alone = BatchGrads(model, make_batch([s], [1]))
        for k in v:
            torch.testing.assert_close(together.sq_norms()[k][i], alone.sq_norms()[k][0], rtol=1e-5, atol=0)
            torch.testing.assert_close(together.dots(v)[k][i], alone.dots(v)[k][0], rtol=1e-4, atol=1e-7)


def test_heads_that_are_not_a_plain_matmul_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from automixer_ops.influence.grads import check_plain_head

    check_plain_head(tiny_llama(False))
    check_plain_head(tiny_llama(True))
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=61, hidden_size=16, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                       final_logit_softcapping=1.0)
    with pytest.raises(AutomixerError, match="Gemma2ForCausalLM: its logits are not the output layer times"):
        check_plain_head(Gemma2ForCausalLM(cfg).eval())


def test_kept_gradients_hold_no_more_memory_than_they_count():
    from automixer_ops.influence.grads import BatchGrads, Workspace

    model = tiny_llama(False)
    # One long sample (its gradient built whole, so kept) and short ones (their norms in the Gram form).
    bg = BatchGrads(model, make_batch(random_samples(61, [33] + [2] * 15, seed=1), [1] * 16))
    v = {k: torch.randn(w.shape) for k, w in [("embed", model.get_input_embeddings().weight),
                                              ("output", model.get_output_embeddings().weight)]}
    bg.sq_norms_and_dots(v, keep=Workspace())
    assert bg.kept_elements() == 61 * 16
    assert bg._kept.untyped_storage().nbytes() == 4 * bg.kept_elements()  # not a view of a 16-slot buffer


# ------------------------------------------------------------------ the step


def read_scores(run_dir, step):
    return pq.read_table(sorted((run_dir / "scores" / f"step={step}").glob("part-*.parquet"))).to_pylist()


def copy_of_scoring_run(scoring_run, *settings: str):
    """scoring_run's run under the id and settings given (e.g. "run.id=x"), without its scores: the config."""
    cfg = load_config(scoring_run, list(settings))
    shutil.copytree(load_config(scoring_run).run_dir, cfg.run_dir, symlinks=True,
                    ignore=shutil.ignore_patterns("scores"))
    return cfg


def test_score_step_covers_the_corpus_once_per_sampler_and_matches_the_in_memory_fit(scoring_run, tmp_path):
    from automixer_ops.influence.score import Scorer, score

    cfg = load_config(scoring_run)
    logs = []
    score(cfg, log=logs.append)
    corpus = pq.read_table(sorted(cfg.run_dir.glob("corpus/part-*.parquet"))).to_pylist()
    assert len(list(cfg.run_dir.glob("corpus/part-*.parquet"))) == 4
    for step in (10, 30):
        rows = read_scores(cfg.run_dir, step)
        assert sorted(r["id"] for r in rows) == sorted(d["id"] for d in corpus)
        assert {r["id"]: r["n_tokens"] for r in rows} == {d["id"]: d["n_tokens"] for d in corpus}
        assert all(np.isfinite(r["utility"]) for r in rows) and len({r["utility"] for r in rows}) > 50
        fit = json.loads((cfg.run_dir / "scores" / f"step={step}" / "fit.json").read_text())
        assert fit["n"] == len(corpus) and set(fit["layers"]) == {"embed", "output"}
    schema = pq.read_schema(next((cfg.run_dir / "scores" / "step=10").glob("part-*.parquet")))
    assert [(f.name, str(f.type)) for f in schema] == [("id", "string"), ("utility", "float"), ("n_tokens", "int64")]

    # The streamed three-pass step equals the in-memory fit on the same documents and validation set.
    scorer = Scorer(cfg, 30, log=lambda _: None)
    docs = [d for i in range(len(scorer.shards)) for d in scorer.read_shard(i)]
    # Each document is scored as EOS + its first max_seq_len - 1 tokens (64 in this run).
    text = {d["id"]: d["text"] for d in corpus}
    long_doc = next(d for d in docs if d.n_tokens > 100)
    assert long_doc.ids == [scorer.eos] + scorer.tokenizer(text[long_doc.id], add_special_tokens=False)["input_ids"][:63]
    batches = [make_batch([docs[i].ids for i in grp], [1] * len(grp), scorer.pad)
               for grp in length_batches([len(d.ids) for d in docs], 512)]
    order = [i for grp in length_batches([len(d.ids) for d in docs], 512) for i in grp]
    fit = fit_in_memory(scorer.model, list(scorer.validation_batches()), batches)
    expected = np.empty(len(docs), np.float32)
    expected[order] = utilities(scorer.model, batches, fit).numpy()
    got = {r["id"]: r["utility"] for r in read_scores(cfg.run_dir, 30)}
    np.testing.assert_allclose([got[d.id] for d in docs], expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_a_tied_checkpoint_is_scored_as_one_layer_and_matches_the_in_memory_fit(trained, small_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automixer_ops.influence.score import Scorer, score
    from automixer_ops.samplers import Sampler

    _, trained_dir = trained
    src = trained_dir / "checkpoints" / "step-30"
    model = AutoModelForCausalLM.from_pretrained(str(src), tie_word_embeddings=True)  # brought by a user
    model.tie_weights()
    model.save_pretrained(str(tmp_path / "tied"))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(tmp_path / "tied"))
    cfg = load_config(linked_scoring_run(tmp_path, trained_dir, small_corpus, "tied", {5: tmp_path / "tied"},
                                         [Sampler(5, ["piqa"], 1.0)], {"piqa": piqa_pairs(6)}, docs_per_shard=40,
                                         influence={"max_seq_len": 48, "batch_tokens": 384}))

    score(cfg, log=lambda _: None)
    out = cfg.run_dir / "scores" / "step=5"
    assert json.loads((out / "fit.json").read_text())["layers"] == ["tied"]
    scorer = Scorer(cfg, 5, log=lambda _: None)
    assert scorer.model.config.tie_word_embeddings
    docs = [d for i in range(len(scorer.shards)) for d in scorer.read_shard(i)]
    groups = list(length_batches([len(d.ids) for d in docs], 384))
    batches = [make_batch([docs[i].ids for i in grp], [1] * len(grp), scorer.pad) for grp in groups]
    fit = fit_in_memory(scorer.model, list(scorer.validation_batches()), batches)
    expected = np.empty(len(docs), np.float32)
    expected[[i for grp in groups for i in grp]] = utilities(scorer.model, batches, fit).numpy()
    got = {r["id"]: r["utility"] for r in read_scores(cfg.run_dir, 5)}
    np.testing.assert_allclose([got[d.id] for d in docs], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_rerun_skips_finished_work_and_a_killed_run_resumes(scoring_run):
    from automixer_ops.influence.score import score

    cfg = load_config(scoring_run)
    score(cfg, step=10, log=lambda _: None)
    out = cfg.run_dir / "scores" / "step=10"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    logs = []
    score(cfg, step=10, log=logs.append)
    assert any("fit already done" in m for m in logs) and any("0 shard(s) scored, 4 already done" in m for m in logs)
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    # Killed scoring jobs: one shard never written, one killed while writing (its temp file left behind).
    (out / "part-00002.parquet").unlink()
    (out / "part-00003.parquet").unlink()
    (out / ".part-00003.parquet.0123abcd.tmp").write_bytes(b"partial")
    logs = []
    score(cfg, step=10, shards="2:", log=logs.append)
    assert any("2 shard(s) scored, 0 already done" in m for m in logs)
    assert len(read_scores(cfg.run_dir, 10)) == 108


def test_a_fit_killed_in_pass_1_resumes_from_its_checkpoint_and_gives_the_same_fit(scoring_run, monkeypatch):
    from safetensors.torch import load_file

    from automixer_ops.influence import score as score_mod

    cfg = copy_of_scoring_run(scoring_run, "run.id=sc_resume", "influence.fit_samples=90")
    out = cfg.run_dir / "scores" / "step=30"
    score_mod.score(cfg, step=30, fit_only=True, log=lambda _: None)  # as the step runs
    whole = load_file(str(out / "fit.safetensors"))
    whole_info = json.loads((out / "fit.json").read_text())
    shutil.rmtree(out)

    # Every document's coefficient from pass 2 (the series is still summed), so that pass 2 runs too.
    monkeypatch.setattr("automixer_ops.influence.datainf.SERIES_MAX_RATIO", 0.0)

    def killed_at_shard_3(msg):
        if "pass 1 shard 3/4" in msg:
            raise KeyboardInterrupt
    monkeypatch.setattr(score_mod, "CHECKPOINT_EVERY_S", 0.0)  # a checkpoint after every shard
    with pytest.raises(KeyboardInterrupt):
        score_mod.score(cfg, step=30, fit_only=True, log=killed_at_shard_3)
    assert torch.load(out / ".fit" / "pass1.pt")["next_shard"] == 2 and not (out / "fit.json").exists()
    logs = []
    score_mod.score(cfg, step=30, fit_only=True, log=logs.append)
    assert not any("pass 1 shard 1/4" in m or "pass 1 shard 2/4" in m for m in logs)
    assert any("pass 1 shard 3/4" in m for m in logs)
    assert "step 30: pass 2 reread 90 of 90 fit documents" in logs
    resumed = load_file(str(out / "fit.safetensors"))
    assert json.loads((out / "fit.json").read_text())["lambda"] == pytest.approx(whole_info["lambda"], rel=1e-12)
    for name, t in whole.items():
        torch.testing.assert_close(resumed[name], t, rtol=1e-6, atol=1e-6 * float(t.abs().max()))

    # Killed in pass 2 at its third shard: the rerun keeps pass 1 and resumes pass 2's fp64 sum there.
    read_stats, calls, kill = score_mod._read_stats, [], [True]

    def killed_at_stats_2(path):
        calls.append(path.name)
        if path.name == "stats-00002.parquet" and kill:
            kill.clear()  # the first time only
            raise KeyboardInterrupt
        return read_stats(path)
    monkeypatch.setattr(score_mod, "_read_stats", killed_at_stats_2)
    with pytest.raises(KeyboardInterrupt):
        score_mod.score(cfg, step=30, fit_only=True, force=True, log=lambda _: None)
    assert torch.load(out / ".fit" / "pass2.pt")["next_shard"] == 2
    logs, calls[:] = [], []
    score_mod.score(cfg, step=30, fit_only=True, log=logs.append)
    assert not any("pass 1 shard" in m for m in logs) and calls == ["stats-00002.parquet", "stats-00003.parquet"]
    assert "step 30: pass 2 reread 90 of 90 fit documents" in logs  # the count carried over the kill
    again = load_file(str(out / "fit.safetensors"))
    for name, t in whole.items():
        torch.testing.assert_close(again[name], t, rtol=1e-6, atol=1e-6 * float(t.abs().max()))


def test_force_restarts_a_killed_fit_and_work_of_other_series_settings_is_not_resumed(scoring_run, monkeypatch):
    from automixer_ops.influence import score as score_mod

    cfg = copy_of_scoring_run(scoring_run, "run.id=sc_force", "influence.fit_samples=90")
    out = cfg.run_dir / "scores" / "step=30"
    monkeypatch.setattr(score_mod, "CHECKPOINT_EVERY_S", 0.0)

    def kill_at_shard_3(msg):
        if "pass 1 shard 3/4" in msg:
            raise KeyboardInterrupt

    def killed_fit(**kw):
        with pytest.raises(KeyboardInterrupt):
            score_mod.score(cfg, step=30, fit_only=True, log=kill_at_shard_3, **kw)
        assert torch.load(out / ".fit" / "pass1.pt")["next_shard"] == 2

    killed_fit()
    logs = []
    score_mod.score(cfg, step=30, fit_only=True, force=True, log=logs.append)
    assert any("--force" in m for m in logs) and any("pass 1 shard 1/4" in m for m in logs)  # from the start
    # Series settings changed (a code update) between the kill and the rerun: the work is redone, not loaded.
    killed_fit(force=True)
    monkeypatch.setattr("automixer_ops.influence.datainf.SERIES_MAX_RATIO", 1e-5)
    logs = []
    score_mod.score(cfg, step=30, fit_only=True, log=logs.append)
    assert any("pass 1 shard 1/4" in m for m in logs) and (out / "fit.json").is_file()


def test_a_fit_whose_two_files_disagree_is_not_used(scoring_run):
    from safetensors.torch import load_file, save_file

    from automixer_ops.influence.score import score

    cfg = copy_of_scoring_run(scoring_run, "run.id=sc_torn")
    score(cfg, step=10, fit_only=True, log=lambda _: None)
    out = cfg.run_dir / "scores" / "step=10"
    # A refit stopped between its two files: fit.safetensors from another fit under the current fit.json.
    save_file(load_file(str(out / "fit.safetensors")), str(out / "fit.safetensors"), metadata={"fingerprint": "x"})
    with pytest.raises(AutomixerError, match="fit.json and fit.safetensors are not both from the fit"):
        score(cfg, step=10, shards="0:1", log=lambda _: None)
    logs = []
    score(cfg, step=10, log=logs.append)  # a full run makes the fit again
    assert "step 10: fit.safetensors is missing or from another fit; refitting and rescoring" in logs
    assert any("pass 1 shard 1/4" in m for m in logs) and any("4 shard(s) scored" in m for m in logs)

    # A part from an earlier fit (a shard job that ran on while the fit was redone) stops regroup.
    from automixer_ops.regroup import regroup

    score(cfg, step=30, log=lambda _: None)
    part = out / "part-00001.parquet"
    pq.write_table(pq.read_table(part).replace_schema_metadata({"fit": "an-earlier-fit"}), part)
    with pytest.raises(AutomixerError, match=r"step=10: 1 score shard\(s\) not made with the sampler's current fit"):
        regroup(cfg, log=lambda _: None)


def test_validation_sets_of_another_validation_range_are_refused(scoring_run):
    from automixer_ops.influence.score import score
    from automixer_ops.rundir import write_marker

    cfg = copy_of_scoring_run(scoring_run, "run.id=sc_valn", "tasks.docs.validation=[100, 108]")
    write_marker(cfg.run_dir / "valsets", {"validation": [100, 105]})  # as `evaluate` records it
    with pytest.raises(ConfigError, match=r"tasks.docs.validation: \[100, 108\), but .*valsets was written with "
                                          r"documents \[100, 105\); rerun `automixer evaluate`"):
        score(cfg, step=10, fit_only=True, log=lambda _: None)
    write_marker(cfg.run_dir / "valsets", {"val_docs_per_task": 8})  # an older evaluate's marker
    with pytest.raises(ConfigError, match=r"written with the first 8 documents \(an older version\); rerun"):
        score(cfg, step=10, fit_only=True, log=lambda _: None)
    write_marker(cfg.run_dir / "valsets", {"validation": [100, 108]})
    score(cfg, step=10, fit_only=True, log=lambda _: None)
    assert (cfg.run_dir / "scores" / "step=10" / "fit.json").is_file()


def test_validation_pairs_are_cut_from_the_left_like_lm_eval(scoring_run, monkeypatch):
    from automixer_ops.influence.score import Scorer

    cfg = load_config(scoring_run, ["influence.max_seq_len=8"])
    scorer = Scorer(cfg, 10, log=lambda _: None)
    pairs = [{"doc": 0, "context": "Question: which", "continuation": " one of these is the longest answer here"},
             {"doc": 1, "context": "Q:", "continuation": " yes"}]
    monkeypatch.setattr("automixer_ops.tasks.read_validation_set", lambda run_dir, task: pairs)
    batch = next(b for b, _ in scorer.validation_batches())
    enc = scorer.tokenizer.backend_tokenizer
    for p, row, mask, weight in zip(pairs, batch.input_ids, batch.attention_mask, batch.loss_weight):
        ctx, cont = (enc.encode(p[k], add_special_tokens=False).ids for k in ("context", "continuation"))
        full = [scorer.eos] + ctx + cont
        n = int(mask.sum())
        assert row[:n].tolist() == full[-8:]  # the window's tokens follow their real predecessors
        scored = min(len(cont), 7)  # every continuation token in the window, and no context token
        assert torch.count_nonzero(weight).item() == scored and weight[n - 1 - scored:n - 1].sum() == pytest.approx(1)


def test_shard_jobs_need_a_current_fit_and_name_bad_ranges(scoring_run, tmp_path):
    from automixer_ops.influence.score import score

    cfg = copy_of_scoring_run(scoring_run, "run.id=sc2")
    with pytest.raises(AutomixerError, match="no fit for sampler step 10.*--fit-only"):
        score(cfg, step=10, shards="0:2", log=lambda _: None)
    with pytest.raises(AutomixerError, match="not a sampler of this run"):
        score(cfg, step=20, log=lambda _: None)
    score(cfg, step=10, fit_only=True, log=lambda _: None)
    out = cfg.run_dir / "scores" / "step=10"
    assert (out / "fit.json").is_file() and not list(out.glob("part-*.parquet"))
    with pytest.raises(AutomixerError, match="--shards '7:9': START must be a shard of the corpus, 0..3"):
        score(cfg, step=10, shards="7:9", log=lambda _: None)
    score(cfg, step=10, shards="1:3", log=lambda _: None)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00001.parquet", "part-00002.parquet"]

    # Other inputs (a changed validation set): shard jobs refuse the stale fit; a full run refits and rescores.
    write_valset(cfg.run_dir, "piqa", piqa_pairs(5))
    with pytest.raises(AutomixerError, match="made with other inputs"):
        score(cfg, step=10, shards="0:1", log=lambda _: None)
    logs = []
    score(cfg, step=10, log=logs.append)
    assert any("refitting" in m for m in logs) and any("4 shard(s) scored" in m for m in logs)


def test_fit_samples_fits_on_a_seeded_subsample(scoring_run):
    from automixer_ops.influence.score import score

    cfg = copy_of_scoring_run(scoring_run, "run.id=sc3", "influence.fit_samples=25")
    score(cfg, step=30, log=lambda _: None)
    out = cfg.run_dir / "scores" / "step=30"
    fit = json.loads((out / "fit.json").read_text())
    assert fit["n"] == 25 and fit["settings"]["fit_samples"] == 25
    assert len(read_scores(cfg.run_dir, 30)) == 108
    # The fit set is the run seed's uniform choice of 25 of the corpus' 108 rows, in shard order.
    corpus_ids = pq.read_table(sorted(cfg.run_dir.glob("corpus/part-*.parquet")), columns=["id"])["id"].to_pylist()
    picked = np.random.default_rng(cfg.run.seed).choice(len(corpus_ids), 25, replace=False)
    fitted = pq.read_table(sorted((out / ".fit").glob("stats-*.parquet")), columns=["id"])["id"].to_pylist()
    assert sorted(fitted) == sorted(corpus_ids[i] for i in picked)


def test_a_nan_is_reported_by_document_id_and_nothing_is_written(scoring_run):
    from safetensors.torch import load_file, save_file

    from automixer_ops.influence.score import score

    cfg = load_config(scoring_run, ["run.id=sc4"])
    shutil.copytree(load_config(scoring_run).run_dir, cfg.run_dir, symlinks=True,
                    ignore=shutil.ignore_patterns("scores", "checkpoints"))
    # A checkpoint whose embedding row of one token is NaN: only documents containing that token break.
    # The token is one the validation set never uses, so the fit's first pass meets it.
    from automixer_ops.influence.score import Scorer

    scorer = Scorer(load_config(scoring_run), 10, log=lambda _: None)
    val_tokens = {t for b, _ in scorer.validation_batches() for t in b.input_ids.flatten().tolist()}
    docs = [d for i in range(len(scorer.shards)) for d in scorer.read_shard(i)]
    token = next(t for d in docs for t in d.ids if t not in val_tokens)
    broken = sorted(d.id for d in docs if token in d.ids)
    src = load_config(scoring_run).run_dir / "checkpoints" / "step-10"
    dst = cfg.run_dir / "checkpoints" / "step-10"
    shutil.copytree(src.resolve(), dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AutomixerError, match=rf"part-00000.parquet: {len([b for b in broken if b in {d.id for d in scorer.read_shard(0)}])} document\(s\) give a NaN.*id '") as err:
        score(cfg, step=10, log=lambda _: None)
    assert any(f"'{b}'" in str(err.value) for b in broken)
    assert not list((cfg.run_dir / "scores" / "step=10").glob("part-*.parquet"))
    assert not (cfg.run_dir / "scores" / "step=10" / "fit.json").exists()


# ------------------------------------------------------------------ behaviour


def test_sgd_on_the_top_decile_lowers_validation_loss_more_than_on_the_bottom_decile(scoring_run):
    """First-order meaning of utility: training on high-utility documents helps the sampler's task."""
    from transformers import AutoModelForCausalLM

    from automixer_ops.influence.grads import BatchGrads
    from automixer_ops.influence.score import Scorer, score

    cfg = load_config(scoring_run)
    score(cfg, step=30, log=lambda _: None)
    utility = {r["id"]: r["utility"] for r in read_scores(cfg.run_dir, 30)}
    scorer = Scorer(cfg, 30, log=lambda _: None)
    docs = [d for i in range(len(scorer.shards)) for d in scorer.read_shard(i)]
    docs.sort(key=lambda d: utility[d.id])
    k = len(docs) // 10
    val = list(scorer.validation_batches())

    def val_loss(model):
        with torch.no_grad():
            return sum(float((BatchGrads(model, b).loss_per_sample * c).sum()) for b, c in val)

    def after_sgd(subset):
        model = AutoModelForCausalLM.from_pretrained(str(scorer.checkpoint), dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        batch = make_batch([d.ids for d in subset], [1] * len(subset), scorer.pad)
        for _ in range(3):
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logp = torch.log_softmax(loss[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
            (-(logp * batch.loss_weight[:, :-1]).sum() / len(subset)).backward()
            opt.step()
            opt.zero_grad()
        return val_loss(model.eval())

    base = val_loss(scorer.model)
    top, bottom = after_sgd(docs[-k:]), after_sgd(docs[:k])
    assert base - top > base - bottom, (base, top, bottom)
    assert top < base
