"""The training loop train-proxy and train-target share (nanoGPT-style, on transformers' Llama).

A Llama decoder at a named size preset, trained with AdamW, linear warmup and cosine decay on
batches that are a pure function of the micro-batch index (`Batches.batch(i)`), so a killed run
resumes exactly: checkpoints are HF `save_pretrained` directories `step-<N>/` (model +
tokenizer), each staged and renamed into place, and the latest holds `trainer_state.pt`
(optimizer, scheduler, RNG). Each checkpoint records the fingerprint of what its weights depend
on; a checkpoint trained with other settings or data is refused, never resumed.

The proxy (proxy.py) feeds it the corpus in a seeded permutation of windows; a target model
(train_target.py) feeds it a mixture in the mixture's own order.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from automixer_ops.checkpoints import TRAINER_STATE, list_checkpoints, pick_device
from automixer_ops.config import ProxySection
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.progress import Progress
from automixer_ops.rundir import (SUCCESS, RunDir, atomic_write_text, clean_stale_staging, fingerprint, publish,
                                  read_marker, staged_directory, write_marker)

# Llama shapes per preset. Parameter counts (docs/proxy.md) are for a 32,000-token
# vocabulary with untied embeddings; the run's own vocabulary changes the embedding part.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "25m": dict(hidden_size=256, num_hidden_layers=10, num_attention_heads=4, intermediate_size=768),
    "50m": dict(hidden_size=384, num_hidden_layers=14, num_attention_heads=6, intermediate_size=1024),
    "75m": dict(hidden_size=512, num_hidden_layers=13, num_attention_heads=8, intermediate_size=1408),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=2816),
    "1.5b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, intermediate_size=5632),
}


def model_config(preset: str, vocab_size: int, max_positions: int, tokenizer=None):
    from transformers import LlamaConfig

    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_positions,
                       tie_word_embeddings=False, **PRESETS[preset], **special)



def lr_lambda(p: ProxySection) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < p.warmup_steps:
            return (step + 1) / p.warmup_steps
        progress = min(1.0, (step - p.warmup_steps) / max(1, p.max_steps - p.warmup_steps))
        return p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class Batches(Protocol):
    """Training data: micro-batch i as a (batch_size, seq_len) tensor of token ids, a pure function of i."""

    n_windows: int  # sequences of seq_len tokens the data holds
    n_tokens: int

    def batch(self, micro_batch_index: int): ...


@dataclass
class TrainJob:
    """One training run: where its checkpoints go, its settings and data, and what its weights depend on."""

    name: str  # "train-proxy", "train-target": in logs and progress bars
    run: RunDir  # checkpoints under run.checkpoints
    settings: ProxySection
    seed: int
    data: Batches
    tokenizer: object
    fingerprint: dict  # settings, seed and data; every checkpoint records it
    log_path: Path  # JSON lines: step, loss, lr, tokens_per_s
    retrain_hint: str  # what to tell a user whose checkpoints were trained otherwise
    save_steps: frozenset[int] = frozenset()  # checkpoints besides every save_every and the last (stage boundaries)


def settings_fingerprint(settings: ProxySection) -> dict:
    """The training settings the weights depend on (not where or how often to log)."""
    p = asdict(settings)
    for key in ("log_every", "checkpoints", "device"):
        p.pop(key)
    return p


def checked_checkpoints(run: RunDir, fingerprint: dict, otherwise: str) -> dict[int, Path]:
    """The run's checkpoints by step; one trained from other inputs is refused (`otherwise` says what to do)."""
    existing = list_checkpoints(run)
    for path in existing.values():
        got = (read_marker(path) or {}).get("train")
        if got is not None and got != fingerprint:
            raise ConfigError(f"{path} was trained with {otherwise}")
    return existing


def _tokenizer_identity(tokenizer) -> str:
    """Which token ids a text becomes: the tokenizer's vocabulary and merges (its serialized model)."""
    return fingerprint(tokenizer.backend_tokenizer.to_str())


def pack_documents(files: list[Path], out: Path, tokenizer, identity: dict, log: Callable[[str], None]) -> np.memmap:
    """The `text` of the Parquet `files`, in file and row order, as one token array `out/tokens.bin` (EOS after
    each document). Rebuilt only when `identity` (what the files are), the tokenizer or the dtype changed."""
    import pyarrow.parquet as pq

    path = out / "tokens.bin"
    meta = read_marker(out)
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    identity = {**identity, "tokenizer": _tokenizer_identity(tokenizer), "dtype": np.dtype(dtype).name}
    if meta is None or any(meta.get(k) != v for k, v in identity.items()):
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(out)
        (out / SUCCESS).unlink(missing_ok=True)  # the old marker never vouches for the new tokens.bin
        n_docs = sum(pq.ParquetFile(shard).metadata.num_rows for shard in files)
        with staged_directory(out) as stage, Progress(f"pack {out.name}/tokens.bin", n_docs, "doc") as progress:
            n = 0
            with open(stage / "tokens.bin", "wb") as f:
                for shard in files:
                    for batch in pq.ParquetFile(shard).iter_batches(batch_size=512, columns=["text"]):
                        enc = tokenizer.backend_tokenizer.encode_batch_fast(batch.column("text").to_pylist(),
                                                                            add_special_tokens=False)
                        ids = np.fromiter((t for e in enc for t in (*e.ids, tokenizer.eos_token_id)), dtype=dtype)
                        f.write(ids.tobytes())
                        n += len(ids)
                        progress.update(batch.num_rows, tokens=len(ids))
                f.flush()
                os.fsync(f.fileno())
            write_marker(stage, {"n_tokens": n, **identity})
            os.replace(stage / "tokens.bin", path)
            os.replace(stage / SUCCESS, out / SUCCESS)
        meta = read_marker(out)
        log(f"packed {meta['n_tokens']:,} tokens into {path}")
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def train(job: TrainJob, log: Callable[[str], None] = print, stop_after: int | None = None,
          stop_at: int | None = None) -> dict[int, Path]:
    """Train (or resume) to settings.max_steps; returns the checkpoints by step.

    `stop_after` ends the process's work after that many steps (for tests of resumption); `stop_at` ends it at
    that step (saved: it must be in save_steps), e.g. the end of a stage whose successor's data is not drawn yet.
    """
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()  # per-checkpoint "Writing model shards" bars
    p, run, tokenizer, data = job.settings, job.run, job.tokenizer, job.data
    ckpt_root = run.checkpoints
    ckpt_root.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(ckpt_root)
    existing = checked_checkpoints(run, job.fingerprint, f"other settings or data; {job.retrain_hint}")
    if p.max_steps in existing:
        log(f"{job.name}: already trained to step {p.max_steps}; nothing to do")
        return existing
    if stop_at is not None and stop_at not in job.save_steps | {p.max_steps}:
        raise ValueError(f"stop_at {stop_at}: not a step the trainer saves")  # a bug of the caller
    if stop_at is not None and any(s >= stop_at for s in existing):
        return existing

    device = pick_device(p.device)
    resumable = [s for s, path in existing.items() if (path / TRAINER_STATE).is_file() and not path.is_symlink()]
    torch.manual_seed(job.seed)
    if resumable:
        start = max(resumable)
        model = LlamaForCausalLM.from_pretrained(str(existing[start]), dtype=torch.float32)
    else:
        start = 0
        model = LlamaForCausalLM(model_config(p.preset, len(tokenizer),
                                              max(p.seq_len, tokenizer.model_max_length), tokenizer))
    model.to(device).train()
    decay = [w for w in model.parameters() if w.dim() >= 2]
    no_decay = [w for w in model.parameters() if w.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=p.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(p))
    if resumable:
        state = load_trainer_state(existing[start] / TRAINER_STATE, device)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise AutomixerError(f"{existing[start] / TRAINER_STATE}: does not fit this model and optimizer "
                                 f"({type(e).__name__}: {e}); {job.retrain_hint}") from None
        log(f"{job.name}: resuming from step {start} ({existing[start]})")
    n_params = sum(w.numel() for w in model.parameters())
    log(f"{job.name} '{p.preset}': {n_params:,} parameters, {data.n_tokens:,} data tokens, "
        f"{data.n_windows:,} sequences of {p.seq_len}; training steps {start + 1}..{p.max_steps} on {device}")

    _truncate_log(job.log_path, start)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else _null()
    tokens_per_step = p.batch_size * p.grad_accum * p.seq_len
    t_last, steps_since = time.perf_counter(), 0
    loss_sum = 0.0
    with Progress(job.name, total=p.max_steps, unit="step", initial=start) as progress:
        for step in range(start + 1, p.max_steps + 1):
            step_loss = 0.0
            for micro in range(p.grad_accum):
                x = data.batch((step - 1) * p.grad_accum + micro).to(device)
                with autocast:
                    loss = model(input_ids=x, labels=x).loss / p.grad_accum
                loss.backward()
                step_loss += loss.item()
            if p.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(step_loss):
                raise AutomixerError(f"{job.name}: training loss is {step_loss} at step {step}; "
                                     "lower the learning rate")
            loss_sum += step_loss
            steps_since += 1
            progress.update(1, tokens=tokens_per_step)
            progress.note(loss=step_loss)
            if step % p.log_every == 0 or step == p.max_steps:
                now = time.perf_counter()
                entry = {"step": step, "loss": loss_sum / steps_since, "lr": scheduler.get_last_lr()[0],
                         "tokens_per_s": tokens_per_step * steps_since / (now - t_last)}
                with open(job.log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                if progress.mode != "bars":  # a bar shows the same; a log keeps these lines
                    log(f"step {step:>6}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                        f"{entry['tokens_per_s']:,.0f} tok/s")
                t_last, steps_since, loss_sum = now, 0, 0.0
            if step % p.save_every == 0 or step == p.max_steps or step in job.save_steps:
                progress.doing(f"saving step-{step}")
                _save(run, step, model, tokenizer, optimizer, scheduler, job.fingerprint, step_loss)
                progress.doing(None)
            if (stop_after is not None and step - start >= stop_after) or step == stop_at:
                break
    return list_checkpoints(run)


def load_trainer_state(path: Path, device) -> dict:
    """What _save wrote: tensors, numbers, lists and dicts only, so torch.load's weights_only mode (no arbitrary
    unpickling: a crafted file cannot run code) reads it."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AutomixerError(f"{path}: not a trainer state the trainer wrote, or damaged (loaded with "
                             f"weights_only, which refuses arbitrary objects: {first}); delete its "
                             "checkpoints/ to retrain") from None
    if not isinstance(state, dict):
        raise AutomixerError(f"{path}: not a trainer state the trainer wrote; delete the run's checkpoints/ to retrain")
    return state


def _save(run: RunDir, step: int, model, tokenizer, optimizer, scheduler, fingerprint: dict, loss: float) -> None:
    import torch

    root = run.checkpoints
    # Never a linked checkpoint: its trainer_state.pt is in the user's directory.
    previous = [s for s, path in list_checkpoints(run).items()
                if (path / TRAINER_STATE).exists() and not path.is_symlink()]
    with staged_directory(root) as stage:
        model.save_pretrained(str(stage / "model"))
        tokenizer.save_pretrained(str(stage / "model"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "step": step}, stage / "model" / TRAINER_STATE)
        write_marker(stage / "model", {"step": step, "loss": loss, "train": fingerprint})
        publish(stage / "model", root / f"step-{step}")
    # Only the latest checkpoint needs optimizer state to resume; the others stay plain HF dirs.
    for s in previous:
        if s != step and not (root / f"step-{s}").is_symlink():
            (root / f"step-{s}" / TRAINER_STATE).unlink(missing_ok=True)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (a killed run may have written them)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a crash
    atomic_write_text(path, "".join(line + "\n" for line in keep))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
