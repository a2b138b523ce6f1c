from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import proxy_config

from automixer_ops.config import load_config
from automixer_ops.errors import ConfigError
from automixer_ops.prepare import prepare
from automixer_ops.rundir import RunDir
from automixer_ops.checkpoints import TRAINER_STATE, list_checkpoints
from automixer_ops.proxy import PRESETS, model_config, train_proxy

def weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(ckpt / "model.safetensors"))


def test_training_loss_falls_and_checkpoints_load(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir = trained
    log = [json.loads(line) for line in (run_dir / "proxy" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [5, 10, 15, 20, 25, 30]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5, log
    assert all(e["tokens_per_s"] > 0 for e in log)
    ckpts = list_checkpoints(RunDir(run_dir))
    assert list(ckpts) == [10, 20, 30]
    # Only the latest checkpoint keeps optimizer state; every one is a plain HF directory.
    assert [s for s, p in ckpts.items() if (p / TRAINER_STATE).exists()] == [30]
    losses = []
    for step, path in ckpts.items():
        model = AutoModelForCausalLM.from_pretrained(str(path))
        tok = AutoTokenizer.from_pretrained(str(path))
        ids = tok("The answer is: 42. Question: how many apples", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert all(map(lambda x: 0 < x < 20, losses))


def test_interrupted_training_resumes_exactly(trained, small_corpus, tmp_path):
    _, reference = trained
    cfg = load_config(proxy_config(tmp_path, small_corpus, "b"))
    prepare(cfg, log=lambda _: None)
    train_proxy(cfg, log=lambda _: None, stop_after=15)  # saved step 10; steps 11-15 are lost
    assert list(list_checkpoints(RunDir(cfg.run_dir))) == [10]
    messages = []
    train_proxy(cfg, log=messages.append)
    assert any("resuming from step 10" in m for m in messages)
    a, b = weights(reference / "checkpoints" / "step-30"), weights(cfg.run_dir / "checkpoints" / "step-30")
    for name in a:  # bit for bit: batches are a function of (seed, step), optimizer state is saved
        assert torch.equal(b[name], a[name]), name
    log = [json.loads(line)["step"] for line in (cfg.run_dir / "proxy" / "train_log.jsonl").read_text().splitlines()]
    assert log == [5, 10, 15, 20, 25, 30]  # the lost steps' log lines were replaced, not duplicated


def test_killed_process_continues_from_last_checkpoint(small_corpus, tmp_path):
    config = proxy_config(tmp_path, small_corpus, "k", max_steps=200, save_every=5, log_every=5)
    exe = [sys.executable, "-m", "automixer_ops"]
    assert subprocess.run(exe + ["prepare", "-c", str(config)], capture_output=True).returncode == 0
    ckpts = tmp_path / "runs" / "k" / "checkpoints"
    proc = subprocess.Popen(exe + ["train-proxy", "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (ckpts / "step-10").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name[5:]) for p in ckpts.glob("step-*"))
    assert done and max(done) < 200, done
    again = subprocess.run(exe + ["train-proxy", "-c", str(config)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming from step {max(done)}" in again.stderr
    final = sorted(int(p.name[5:]) for p in ckpts.glob("step-*"))
    assert final[-1] == 200 and set(range(5, 201, 5)) == set(final)
    assert not list(ckpts.glob(".staging-*"))


def test_other_settings_refuse_to_mix_with_existing_checkpoints(trained):
    config, _ = trained
    with pytest.raises(ConfigError, match="trained with other proxy settings"):
        train_proxy(load_config(config, ["proxy.lr=0.001"]), log=lambda _: None)
    messages = []
    train_proxy(load_config(config), log=messages.append)
    assert messages == ["proxy already trained to step 30; nothing to do"]


def test_bring_your_own_checkpoints_are_linked(trained, small_corpus, tmp_path):
    _, run_dir = trained
    refs = [{"step": 1000, "path": str(run_dir / "checkpoints" / "step-10")},
            {"step": 3000, "path": str(run_dir / "checkpoints" / "step-30")}]
    cfg = load_config(proxy_config(tmp_path, small_corpus, "byo", checkpoints=refs),
                      [f"tokenizer.path={run_dir / 'tokenizer'}"])
    prepare(cfg, log=lambda _: None)
    found = train_proxy(cfg, log=lambda _: None)
    assert list(found) == [1000, 3000]
    assert (cfg.run_dir / "checkpoints" / "step-3000").resolve() == (run_dir / "checkpoints" / "step-30").resolve()
    assert not (cfg.run_dir / "proxy" / "tokens.bin").exists()  # nothing was trained
    bad = load_config(proxy_config(tmp_path, small_corpus, "byo", checkpoints=[{"step": 5, "path": str(tmp_path)}]),
                      [f"tokenizer.path={run_dir / 'tokenizer'}"])
    with pytest.raises(ConfigError, match=r"proxy.checkpoints \(step 5\): .* not a Hugging Face checkpoint directory"):
        train_proxy(bad, log=lambda _: None)


@pytest.mark.parametrize("preset, low, high", [("25m", 23e6, 27e6), ("50m", 47e6, 53e6), ("75m", 72e6, 78e6),
                                               ("350m", 340e6, 380e6), ("1.5b", 1.45e9, 1.6e9)])
def test_preset_sizes_match_their_names(preset, low, high):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(model_config(preset, vocab_size=32000, max_positions=2048))
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    assert set(PRESETS) == {"tiny", "25m", "50m", "75m", "350m", "1.5b"}


def test_gradient_accumulation_matches_the_full_batch(trained, small_corpus, tmp_path):
    """2 micro-batches of 4 see the same 8 sequences as one batch of 8: same update."""
    _, reference = trained
    cfg = load_config(proxy_config(tmp_path, small_corpus, "acc", batch_size=4, grad_accum=2, max_steps=30))
    prepare(cfg, log=lambda _: None)
    train_proxy(cfg, log=lambda _: None)
    a, b = weights(reference / "checkpoints" / "step-30"), weights(cfg.run_dir / "checkpoints" / "step-30")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)


def test_dropped_checkpoints_are_unlinked(trained, small_corpus, tmp_path):
    _, run_dir = trained
    refs = [{"step": s, "path": str(run_dir / "checkpoints" / f"step-{s}")} for s in (10, 20)]
    extra = [f"tokenizer.path={run_dir / 'tokenizer'}"]
    cfg = load_config(proxy_config(tmp_path, small_corpus, "drop", checkpoints=refs), extra)
    prepare(cfg, log=lambda _: None)
    assert list(train_proxy(cfg, log=lambda _: None)) == [10, 20]
    cfg = load_config(proxy_config(tmp_path, small_corpus, "drop", checkpoints=refs[1:]), extra)
    assert list(train_proxy(cfg, log=lambda _: None)) == [20]


def test_trainer_state_loads_with_weights_only(trained):
    """What a checkpoint saves to resume from is tensors, numbers and containers only: torch.load's weights_only
    mode (which cannot run code from a crafted file) reads it, and train-proxy loads it no other way."""
    from automixer_ops.proxy import load_trainer_state

    _, run_dir = trained
    path = run_dir / "checkpoints" / "step-30" / TRAINER_STATE
    state = torch.load(path, weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "torch_rng", "step"} and state["step"] == 30
    assert load_trainer_state(path, "cpu")["scheduler"]["last_epoch"] == 30
