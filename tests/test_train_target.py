"""train-target: a fresh model on any method's mixture, in the mixture's order, resumable exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.config import TargetSection
from automixer_ops.train_target import MixtureBatches, read_mixture, train_target

TARGET = TargetSection(preset="tiny", seq_len=32, batch_size=4, warmup_fraction=0.1, checkpoints=3, log_every=2)


def write_mixture(out: Path, run_dir: Path, budget: int, order: str = "forward") -> Path:
    corpus = pq.read_table(sorted((run_dir / "corpus").glob("part-*.parquet"))[0]).to_pylist()[:40]
    rows = corpus if order == "forward" else corpus[::-1]
    out.mkdir(parents=True)
    table = pa.Table.from_pylist([{"id": r["id"], "group": "g", "repeat": 0, "text": r["text"]} for r in rows])
    pq.write_table(table, out / "part-00000.parquet")
    (out / "weights.json").write_text(json.dumps({"token_budget": budget, "tokens": sum(r["n_tokens"] for r in rows)}))
    return out


def weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_steps_follow_the_budget_and_the_data_order_is_the_mixtures(trained, tmp_path):
    _, run_dir = trained
    mixture = write_mixture(tmp_path / "mix", run_dir, budget=32 * 4 * 5 + 1)  # one token past 5 steps
    ckpts = train_target(mixture, tmp_path / "t", TARGET, 0, run_dir / "tokenizer", log=lambda _: None)
    assert max(ckpts) == 6 and sorted(ckpts) == [2, 4, 6]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    texts = pq.read_table(mixture / "part-00000.parquet").column("text").to_pylist()
    expected = [t for text in texts for t in (*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
    stream = np.fromfile(tmp_path / "t" / "data" / "tokens.bin", dtype=np.uint16)
    assert stream.tolist() == expected  # the mixture's documents, in its order, EOS after each
    batches = MixtureBatches(stream, 32, 4)
    assert batches.batch(0).flatten().tolist() == expected[:128]  # read front to back
    assert batches.batch(1).flatten().tolist() == expected[128:256]
    last = batches.n_windows // 4  # past the end: wraps to the start
    assert batches.batch(last)[batches.n_windows % 4].tolist() == expected[:32]
    log = [json.loads(line)["step"] for line in (tmp_path / "t" / "train_log.jsonl").read_text().splitlines()]
    assert log == [2, 4, 6]


def test_interrupted_target_resumes_exactly(trained, tmp_path):
    _, run_dir = trained
    mixture = write_mixture(tmp_path / "mix", run_dir, budget=32 * 4 * 6)
    full = train_target(mixture, tmp_path / "full", TARGET, 7, run_dir / "tokenizer", log=lambda _: None)
    train_target(mixture, tmp_path / "cut", TARGET, 7, run_dir / "tokenizer", log=lambda _: None, stop_after=3)
    messages = []
    cut = train_target(mixture, tmp_path / "cut", TARGET, 7, run_dir / "tokenizer", log=messages.append)
    assert any("resuming from step 2" in m for m in messages)
    a, b = weights(full[6]), weights(cut[6])
    for name in a:
        assert torch.equal(a[name], b[name]), name
    other = train_target(mixture, tmp_path / "seed8", TARGET, 8, run_dir / "tokenizer", log=lambda _: None)
    assert not torch.equal(weights(other[6])["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_another_mixture_is_not_resumed(trained, tmp_path):
    _, run_dir = trained
    train_target(write_mixture(tmp_path / "a", run_dir, 32 * 4 * 2), tmp_path / "t", TARGET, 0, run_dir / "tokenizer",
                 log=lambda _: None)
    other = write_mixture(tmp_path / "b", run_dir, 32 * 4 * 2, order="backward")
    with pytest.raises(ConfigError, match="trained with other settings or data"):
        train_target(other, tmp_path / "t", TARGET, 0, run_dir / "tokenizer", log=lambda _: None)


def test_a_broken_mixture_is_named(trained, tmp_path):
    _, run_dir = trained
    with pytest.raises(AutomixerError, match="no mixture directory"):
        read_mixture(tmp_path / "none")
    mixture = write_mixture(tmp_path / "m", run_dir, 100)
    (mixture / "weights.json").unlink()
    with pytest.raises(AutomixerError, match=r"weights.json: not found; .* is not a finished mixture"):
        read_mixture(mixture)
    (mixture / "weights.json").write_text('{"token_budget": 0}')
    with pytest.raises(AutomixerError, match="token_budget: expected an integer >= 1, got 0"):
        read_mixture(mixture)
    (mixture / "weights.json").write_text('{"token_budget": 10}')
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), mixture / "part-00000.parquet")
    with pytest.raises(AutomixerError, match=r"part-00000.parquet: missing column\(s\) text"):
        read_mixture(mixture)


def test_the_command_trains_the_configs_target_on_a_mixture(trained, tmp_path, capsys):
    from automixer_ops.cli import main

    config, run_dir = trained
    mixture = write_mixture(tmp_path / "mix", run_dir, budget=32 * 4 * 3)
    argv = ["train-target", "-c", str(config), "--mixture", str(mixture), "--out", str(tmp_path / "out"),
            "--seed", "3", "--set", "target.seq_len=32", "--set", "target.batch_size=4",
            "--set", "target.checkpoints=1"]
    assert main(argv) == 0
    assert f"{tmp_path / 'out' / 'checkpoints' / 'step-3'}" in capsys.readouterr().out
    assert main([*argv[:4], str(tmp_path / "nothing"), *argv[5:]]) == 2
    assert "no mixture directory" in capsys.readouterr().err
