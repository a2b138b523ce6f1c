from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import ROOT, proxy_config, write_jsonl

from automixer_ops.cli import main
from automixer_ops.config import load_config
from automixer_ops.errors import ConfigError
from automixer_ops.evaluate import evaluate
from automixer_ops.tasks import read_validation_set
from automixer_ops.prepare import prepare
from automixer_ops.proxy import train_proxy
from automixer_ops.tasks import write_task_yamls

MC_DOCS = [
    {"context": "Question: Which animal says moo?\nAnswer:", "choices": ["a cow", "a cat", "a fish"], "gold": 0},
    {"context": "Question: What is frozen water called?\nAnswer:", "choices": ["steam", "ice"], "gold": 1},
    {"context": "The capital of France is", "choices": ["Paris", "a river", "blue"], "gold": 0},
    {"context": "Question: How many legs does a spider have?\nAnswer:", "choices": ["two", "eight"], "gold": 1},
    {"context": "The sun rises in the", "choices": ["east", "west", "north", "south"], "gold": 0},
    {"context": "Question: What do bees make?\nAnswer:", "choices": ["honey", "milk", "glass"], "gold": 0},
]
LL_DOCS = [{"context": "Question: Natalia sold clips to 48 of her friends.", "continuation": " The answer is: 72"},
           {"context": "The President said that", "continuation": " the nation is strong."}]
# The evaluated run's tasks: 30 multiple-choice and 27 likelihood-only documents (the six and two above first), so
# that every use has documents: selection [0, 20), validation [20, 25), test [25, 40) (clipped to 30 and 27).
DOCS = {"selection": [0, 20], "validation": [20, 25], "test": [25, 40]}
MC_TASK = MC_DOCS + [{"context": f"Question: What is {a} plus {a + 1}?\nAnswer:",
                      "choices": [str(2 * a + 1), str(2 * a + 3), str(a)], "gold": 0} for a in range(24)]
LL_TASK = LL_DOCS + [{"context": f"Count on from {a}:", "continuation": f" {a + 1}, {a + 2}, {a + 3}"}
                     for a in range(24)]
LL_TASK.append(dict(LL_TASK[3]))  # document 26 (a test document) repeats document 3 (a selection document)


@pytest.fixture(scope="module")
def evaluated(trained, small_corpus, tmp_path_factory):
    """Two linked checkpoints (steps 1000, 3000) x arc_easy, piqa and two custom tasks."""
    tmp = tmp_path_factory.mktemp("evaluated")
    _, trained_dir = trained
    write_jsonl(tmp / "mc.jsonl", MC_TASK)
    write_jsonl(tmp / "ll.jsonl", LL_TASK)
    refs = [{"step": 1000, "path": str(trained_dir / "checkpoints" / "step-10")},
            {"step": 3000, "path": str(trained_dir / "checkpoints" / "step-30")}]
    config = proxy_config(tmp, small_corpus, "ev", checkpoints=refs)
    raw = yaml.safe_load(config.read_text())
    raw["tokenizer"]["path"] = str(trained_dir / "tokenizer")
    raw["tasks"] = {"targets": ["arc_easy", "piqa"], "data_dir": str(ROOT / "data" / "benchmarks"),
                    "custom": [{"name": "my_mc", "path": "mc.jsonl"}, {"name": "my_ll", "path": "ll.jsonl"}],
                    "docs": DOCS}
    raw["evaluate"] = {"batch_size": 8}
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    prepare(cfg, log=lambda _: None)
    train_proxy(cfg, log=lambda _: None)
    logs = []
    evaluate(cfg, log=logs.append)
    cfg.logs = logs  # what the first evaluation logged (test_content_duplicates_are_counted)
    return config, cfg


def test_benchmark_table_has_real_lm_eval_metrics(evaluated):
    _, cfg = evaluated
    rows = pq.read_table(cfg.run_dir / "eval" / "benchmark.parquet").to_pylist()
    got = {(r["step"], r["task"], r["metric"]) for r in rows}
    expected = {(s, t, m) for s in (1000, 3000) for t in ("arc_easy", "piqa", "my_mc") for m in ("acc", "acc_norm")}
    expected |= {(s, "my_ll", m) for s in (1000, 3000) for m in ("bits_per_byte", "perplexity")}
    assert got == expected | {(s, t, "gold_ll") for s in (1000, 3000) for t in ("arc_easy", "piqa", "my_mc", "my_ll")}
    for r in rows:
        assert r["n_docs"] == 20  # the selection documents [0, 20) of every task
        if r["metric"] == "perplexity":
            assert r["value"] > 1
        elif r["metric"] == "bits_per_byte":
            assert 0 < r["value"] < 64
        elif r["metric"] == "gold_ll":  # a mean log-probability per token: negative, with a stderr over documents
            assert r["value"] < 0 and r["stderr"] > 0
        else:
            assert 0 <= r["value"] <= 1 and r["stderr"] > 0
    # Accuracies move between checkpoints: the table is measured, not constant.
    by = {(r["step"], r["task"], r["metric"]): r["value"] for r in rows}
    assert any(by[(1000, t, "acc")] != by[(3000, t, "acc")] for t in ("arc_easy", "piqa", "my_mc"))


def test_custom_multiple_choice_accuracy_matches_a_direct_computation(evaluated):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, cfg = evaluated
    ckpt = cfg.run_dir / "checkpoints" / "step-3000"
    model = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    correct = 0
    selection = MC_TASK[:20]
    for doc in selection:
        scores = []
        for choice in doc["choices"]:
            ctx_ids = tok(doc["context"])["input_ids"]
            whole = tok(doc["context"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx_ids), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
    rows = pq.read_table(cfg.run_dir / "eval" / "benchmark.parquet").to_pylist()
    acc = next(r["value"] for r in rows if (r["step"], r["task"], r["metric"]) == (3000, "my_mc", "acc"))
    assert acc == pytest.approx(correct / len(selection))


def test_rerun_resumes_per_checkpoint(evaluated, capsys):
    config, cfg = evaluated
    steps = cfg.run_dir / "eval" / "steps"
    before = {p.name: p.stat().st_mtime_ns for p in steps.glob("*.parquet")}
    (steps / "step-3000.parquet").unlink()  # as if killed while evaluating step 3000
    assert main(["evaluate", "-c", str(config)]) == 0
    err = capsys.readouterr().err
    assert "step 1000: already evaluated" in err and "step 3000: already evaluated" not in err
    assert (steps / "step-1000.parquet").stat().st_mtime_ns == before["step-1000.parquet"]
    assert (steps / "step-3000.parquet").is_file()


def test_validation_sets_use_lm_eval_formatting(evaluated):
    _, cfg = evaluated
    arc = read_validation_set(cfg.run_dir, "arc_easy")
    assert [p["doc"] for p in arc] == [20, 21, 22, 23, 24]  # the validation documents, by their index
    first = json.loads((ROOT / "data" / "benchmarks" / "arc_easy" / "validation.jsonl").read_text().splitlines()[20])
    gold = first["choices"]["text"][first["choices"]["label"].index(first["answerKey"])]
    assert arc[0]["context"] == f"Question: {first['question']}\nAnswer:"
    assert arc[0]["continuation"] == " " + gold
    mc = read_validation_set(cfg.run_dir, "my_mc")
    assert [(p["context"], p["continuation"]) for p in mc] == \
        [(d["context"], " " + d["choices"][d["gold"]]) for d in MC_TASK[20:25]]
    assert read_validation_set(cfg.run_dir, "my_ll")[0]["continuation"] == LL_TASK[20]["continuation"]
    marker = json.loads((cfg.run_dir / "valsets" / "_SUCCESS.json").read_text())
    assert marker["validation"] == [20, 25]
    # Each use's range per task, clipped to the task's documents.
    assert marker["docs"]["test"] == {"arc_easy": [25, 40], "piqa": [25, 40], "my_mc": [25, 30], "my_ll": [25, 27]}


def test_content_duplicates_are_counted_not_refused(evaluated):
    """ll.jsonl's document 26 (test) repeats document 3 (selection): the gold pair is counted in the marker and
    the log; the embedded arc_easy and piqa documents [0, 40) hold no duplicate."""
    _, cfg = evaluated
    marker = json.loads((cfg.run_dir / "valsets" / "_SUCCESS.json").read_text())
    assert marker["content_duplicates"] == 1
    assert marker["content_duplicate_docs"] == [{"task": "my_ll", "selection": [3], "test": [26]}]
    assert any(m.startswith("content overlap: 1 gold (context, continuation) pair(s)") and
               "my_ll selection doc 3 = test doc 26" in m for m in cfg.logs), cfg.logs


def _hand_gold_ll(model, tok, context: str, continuation: str) -> float:
    """EOS + context + continuation (each tokenized alone), one forward: the continuation's summed log-prob / its
    token count."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = [tok.eos_token_id] + ctx + cont
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - len(cont), len(ids))) / len(cont)


def test_gold_ll_matches_a_direct_forward(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from automixer_ops.evaluate import gold_ll_values, mean_and_stderr

    _, trained_dir = trained
    ckpt = trained_dir / "checkpoints" / "step-30"
    model = AutoModelForCausalLM.from_pretrained(str(ckpt)).eval()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    pairs = [{"doc": 0, "context": "Question: Which animal says moo?\nAnswer:", "continuation": " a cow"},
             {"doc": 1, "context": "The President said that", "continuation": " the nation is strong."},
             {"doc": 2, "context": "Q:", "continuation": " yes"}]
    hand = [_hand_gold_ll(model, tok, p["context"], p["continuation"]) for p in pairs]
    got = gold_ll_values(model, tok, pairs, max_len=256, batch_size=2, device="cpu")  # padded batches of 2
    assert got == pytest.approx(hand, rel=1e-5)
    mean, stderr = mean_and_stderr(got)
    assert mean == pytest.approx(sum(hand) / 3, rel=1e-5)
    sd = (sum((h - sum(hand) / 3) ** 2 for h in hand) / 2) ** 0.5
    assert stderr == pytest.approx(sd / 3 ** 0.5, rel=1e-5)


def test_evaluate_model_scores_a_checkpoint_with_its_own_tokenizer(trained, small_corpus, tmp_path):
    """A model outside any run (save_pretrained of model + tokenizer), on the selection and on the test documents;
    the run directory is never made: the tokenizer is the checkpoint's, the task YAMLs go to setup_dir."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from automixer_ops.evaluate import evaluate_model
    from automixer_ops.proxy import model_config

    _, trained_dir = trained
    tok = AutoTokenizer.from_pretrained(str(trained_dir / "tokenizer"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config("tiny", len(tok), 256, tok)).eval()
    target = tmp_path / "target_model"
    model.save_pretrained(str(target))
    tok.save_pretrained(str(target))
    write_jsonl(tmp_path / "mc.jsonl", MC_DOCS[:5])
    write_jsonl(tmp_path / "ll.jsonl", LL_TASK[:5])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "run": {"id": "never_made", "root": "runs"}, "corpus": {"paths": ["x.jsonl"]},
        "tasks": {"targets": [], "custom": [{"name": "my_mc", "path": "mc.jsonl"}, {"name": "my_ll", "path": "ll.jsonl"}],
                  "docs": {"selection": [0, 3], "validation": [3, 4], "test": [4, 9]}},
        "evaluate": {"batch_size": 2}}))
    cfg = load_config(tmp_path / "c.yaml")
    gold = {"my_mc": [(d["context"], " " + d["choices"][d["gold"]]) for d in MC_DOCS[:5]],
            "my_ll": [(d["context"], d["continuation"]) for d in LL_TASK[:5]]}
    hand = {t: [_hand_gold_ll(model, tok, c, x) for c, x in pairs] for t, pairs in gold.items()}

    rows = evaluate_model(cfg, target, "selection", step=7, setup_dir=tmp_path / "setup")
    by = {(r["task"], r["metric"]): r for r in rows}
    assert set(by) == {("my_mc", "acc"), ("my_mc", "acc_norm"), ("my_mc", "gold_ll"), ("my_ll", "bits_per_byte"),
                       ("my_ll", "perplexity"), ("my_ll", "gold_ll")}
    assert {r["step"] for r in rows} == {7} and {r["n_docs"] for r in rows} == {3}
    for task in gold:
        assert by[(task, "gold_ll")]["value"] == pytest.approx(sum(hand[task][:3]) / 3, rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "setup").glob("*.yaml")) == ["my_ll.yaml", "my_mc.yaml"]

    rows = evaluate_model(cfg, target, "test", step=7, setup_dir=tmp_path / "setup")  # [4, 9) clipped to [4, 5)
    by = {(r["task"], r["metric"]): r for r in rows}
    assert {r["n_docs"] for r in rows} == {1}
    for task in gold:
        assert by[(task, "gold_ll")]["value"] == pytest.approx(hand[task][4], rel=1e-5)
        assert by[(task, "gold_ll")]["stderr"] is None  # one document: no stderr
    assert not (tmp_path / "runs").exists()

    with pytest.raises(ValueError, match="use must be 'selection' or 'test'"):
        evaluate_model(cfg, target, "validation")


@pytest.mark.parametrize("lines, expected", [
    (['{"context": "a", "choices": ["x"], "gold": 0}'], "'choices' must be a list of at least 2 strings"),
    (['{"context": "a", "choices": ["x", "y"], "gold": 2}'], "'gold' must be the index of the right choice (0..1)"),
    (['{"context": "a"}'], "needs 'choices' and 'gold' (multiple choice) or 'continuation'"),
    (['{"context": "a", "continuation": "b"}', '{"context": "a", "choices": ["x", "y"], "gold": 0}'],
     "mixes multiple-choice and likelihood-only lines"),
    (['not json'], "not valid UTF-8 JSON"),
])
def test_bad_custom_task_files_name_the_line(tmp_path, lines, expected):
    write_jsonl(tmp_path / "t.jsonl", lines)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"corpus": {"paths": ["x.jsonl"]}, "tasks": {
        "targets": [], "custom": [{"name": "t", "path": "t.jsonl"}]}}))
    with pytest.raises(ConfigError, match=f"{tmp_path / 't.jsonl'}:{len(lines)}: "):
        write_task_yamls(load_config(tmp_path / "c.yaml"), tmp_path / "out")
    with pytest.raises(ConfigError) as err:
        write_task_yamls(load_config(tmp_path / "c.yaml"), tmp_path / "out")
    assert expected in str(err.value)


def test_missing_local_copy_and_unknown_task_are_named(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"corpus": {"paths": ["x.jsonl"]},
                                                      "tasks": {"targets": ["arc_easy"], "data_dir": "nowhere"}}))
    with pytest.raises(ConfigError, match=r"tasks.data_dir: no local copy of 'arc_easy' \(expected .*nowhere/arc_easy"):
        write_task_yamls(load_config(tmp_path / "c.yaml"), tmp_path / "out")
    (tmp_path / "data" / "no_such_task").mkdir(parents=True)
    (tmp_path / "data" / "no_such_task" / "validation.jsonl").write_text("{}\n")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"corpus": {"paths": ["x.jsonl"]},
                                                      "tasks": {"targets": ["no_such_task"], "data_dir": "data"}}))
    with pytest.raises(ConfigError, match="'no_such_task' is not an lm-evaluation-harness task name"):
        write_task_yamls(load_config(tmp_path / "d.yaml"), tmp_path / "out")


def test_checkpoint_identity_follows_the_weights(trained, tmp_path):
    import os
    import shutil

    from automixer_ops.checkpoints import checkpoint_identity

    _, run_dir = trained
    copy = tmp_path / "ckpt"
    shutil.copytree(run_dir / "checkpoints" / "step-10", copy)
    before = checkpoint_identity(copy)
    assert checkpoint_identity(copy) == before
    os.utime(copy / "model.safetensors", ns=(1, 1))  # new weights written in place
    assert checkpoint_identity(copy) != before


def test_a_bad_validation_set_line_is_named_by_file_and_line(tmp_path):
    from automixer_ops.errors import AutomixerError
    from automixer_ops.tasks import read_validation_set

    path = tmp_path / "valsets" / "piqa.jsonl"
    path.parent.mkdir()
    good = json.dumps({"doc": 0, "context": "Q:", "continuation": " A"})
    path.write_text(good + "\n\n" + '{"doc": 1, "context": "Q:"\n')
    with pytest.raises(AutomixerError, match=r"piqa.jsonl:3: not valid JSON"):
        read_validation_set(tmp_path, "piqa")
    path.write_text(good + "\n" + json.dumps({"doc": 1, "context": "Q:", "continuation": 3}) + "\n")
    with pytest.raises(AutomixerError, match=r"piqa.jsonl:2: needs string fields .*continuation"):
        read_validation_set(tmp_path, "piqa")
    path.write_text(good + "\n")
    assert read_validation_set(tmp_path, "piqa") == [json.loads(good)]


def test_long_likelihood_only_continuations_do_not_overflow(trained, small_corpus, tmp_path, capsys):
    """Continuations of 2,000 characters: lm-eval's perplexity, exp(summed NLL), overflows a float (and its bootstrap
    stderr raised OverflowError, exit 1); bits_per_byte is reported instead, perplexity only where it is finite."""
    import math

    from transformers import AutoTokenizer, LlamaForCausalLM

    from automixer_ops.proxy import model_config

    _, trained_dir = trained
    texts = [json.loads(line)["text"] for path in sorted((ROOT / "data" / "corpus").glob("*.jsonl"))
             for line in path.read_text(encoding="utf-8").splitlines()[:40]]
    long = [t for t in texts if len(t) >= 2000][:5]  # 3 selection documents, a validation and a test one
    assert len(long) == 5
    write_jsonl(tmp_path / "long.jsonl", [{"context": "Read this:", "continuation": " " + t[:1999]} for t in long])
    # The tiny proxy's 256 positions hold no 2,000-character continuation: a tiny model with 2,048 (untrained:
    # its summed NLL is larger still).
    tok = AutoTokenizer.from_pretrained(str(trained_dir / "tokenizer"))
    torch.manual_seed(0)
    LlamaForCausalLM(model_config("tiny", len(tok), 2048, tok)).save_pretrained(str(tmp_path / "wide"))
    tok.save_pretrained(str(tmp_path / "wide"))
    config = proxy_config(tmp_path, small_corpus, "long", checkpoints=[{"step": 10, "path": str(tmp_path / "wide")}])
    raw = yaml.safe_load(config.read_text())
    raw["tokenizer"]["path"] = str(trained_dir / "tokenizer")
    raw["tasks"] = {"targets": [], "custom": [{"name": "long_ll", "path": "long.jsonl"}]}
    raw["tasks"]["docs"] = {"selection": [0, 3], "validation": [3, 4], "test": [4, 5]}
    raw["evaluate"] = {"batch_size": 4}
    config.write_text(yaml.safe_dump(raw))
    for step in ("prepare", "train-proxy", "evaluate"):
        assert main([step, "-c", str(config)]) == 0, capsys.readouterr().err
    rows = pq.read_table(load_config(config).run_dir / "eval" / "benchmark.parquet").to_pylist()
    by_metric = {r["metric"]: r for r in rows if r["task"] == "long_ll"}
    assert "bits_per_byte" in by_metric, rows
    assert math.isfinite(by_metric["bits_per_byte"]["value"]) and by_metric["bits_per_byte"]["value"] > 0
    assert by_metric["bits_per_byte"]["n_docs"] == 3
    # A summed NLL of hundreds of tokens: exp() of it is past a float, so no perplexity row (never inf or NaN).
    assert "perplexity" not in by_metric
    assert all(math.isfinite(r["value"]) for r in rows)
