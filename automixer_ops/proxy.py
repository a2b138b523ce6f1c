"""`automixer train-proxy`: the simulation run whose checkpoints become the samplers.

A Llama decoder (transformers' LlamaConfig) at a named size preset, trained on packed
sequences of the prepared corpus with AdamW, linear warmup and cosine decay. Checkpoints
are HF `save_pretrained` directories `checkpoints/step-<N>/` (model + tokenizer), each
written to a staging directory and renamed into place, so a checkpoint that exists is
complete. The latest one also holds `trainer_state.pt` (optimizer, scheduler, RNG), and
the data order is a pure function of (seed, step): a killed run resumes exactly where its
last checkpoint left off.

Or, with `proxy.checkpoints`, the user's own checkpoints are linked into the run instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from automixer_ops.checkpoints import TRAINER_STATE, check_checkpoint_dir, list_checkpoints, pick_device
from automixer_ops.config import Config, ProxySection
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.rundir import (RunDir, atomic_write_text, clean_stale_staging, read_marker, publish,
                                  staged_directory, write_marker)

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


# ---------------------------------------------------------------- packed token stream

def build_token_stream(run: RunDir, tokenizer, log: Callable[[str], None]) -> np.memmap:
    """All corpus documents as one token array (EOS after each), nanoGPT-style, on disk."""
    import pyarrow.parquet as pq

    path = run.proxy / "tokens.bin"
    meta = read_marker(path.parent)
    corpus = read_marker(run.corpus)["fingerprint"]
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    if meta is None or meta.get("corpus") != corpus:  # none yet, or the corpus was prepared again
        clean_stale_staging(run.proxy)
        with staged_directory(run.proxy) as stage:
            n = 0
            with open(stage / "tokens.bin", "wb") as f:
                for shard in run.corpus_shards():
                    for batch in pq.ParquetFile(shard).iter_batches(batch_size=512, columns=["text"]):
                        enc = tokenizer.backend_tokenizer.encode_batch_fast(batch.column("text").to_pylist(),
                                                                            add_special_tokens=False)
                        ids = np.fromiter((t for e in enc for t in (*e.ids, tokenizer.eos_token_id)), dtype=dtype)
                        f.write(ids.tobytes())
                        n += len(ids)
                f.flush()
                os.fsync(f.fileno())
            write_marker(stage, {"n_tokens": n, "dtype": np.dtype(dtype).name, "corpus": corpus})
            os.replace(stage / "tokens.bin", path)
            os.replace(stage / "_SUCCESS.json", path.parent / "_SUCCESS.json")
        meta = read_marker(path.parent)
        log(f"packed {meta['n_tokens']:,} tokens into {path}")
    return np.memmap(path, dtype=meta["dtype"], mode="r")


class PackedBatches:
    """Batch b of step s is a pure function of (seed, s): resuming needs no data state.

    The stream is cut into windows of seq_len tokens; each epoch visits all windows in a
    seeded permutation.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_windows = len(tokens) // seq_len
        if self.n_windows < batch_size:
            raise AutomixerError(f"corpus has {len(tokens):,} tokens: fewer than one batch of "
                                 f"{batch_size} x {seq_len} (lower proxy.batch_size or proxy.seq_len)")
        self._epoch, self._perm = -1, None

    def _window(self, sample: int) -> int:
        epoch, pos = divmod(sample, self.n_windows)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return int(self._perm[pos])

    def batch(self, micro_batch_index: int):
        import torch

        first = micro_batch_index * self.batch_size
        rows = [self._window(first + j) for j in range(self.batch_size)]
        x = np.stack([self.tokens[w * self.seq_len:(w + 1) * self.seq_len] for w in rows]).astype(np.int64)
        return torch.from_numpy(x)


# ---------------------------------------------------------------- training

def lr_lambda(p: ProxySection) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < p.warmup_steps:
            return (step + 1) / p.warmup_steps
        progress = min(1.0, (step - p.warmup_steps) / max(1, p.max_steps - p.warmup_steps))
        return p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def train_fingerprint(cfg: Config, run: RunDir) -> dict:
    """What the weights depend on: proxy settings, seed and the prepared corpus."""
    p = asdict(cfg.proxy)
    for key in ("log_every", "checkpoints", "device"):
        p.pop(key)
    return {"proxy": p, "seed": cfg.run.seed, "corpus": read_marker(run.corpus)["fingerprint"]}


def train_proxy(cfg: Config, log: Callable[[str], None] = print, stop_after: int | None = None) -> dict[int, Path]:
    """Train (or resume) the proxy; returns the checkpoints by step.

    `stop_after` ends the process's work after that many steps (for tests of resumption).
    """
    run = RunDir(cfg.run_dir)
    corpus = read_marker(run.corpus)
    if corpus is None or not isinstance(corpus.get("fingerprint"), str):
        raise AutomixerError(f"{run.corpus}: no prepared corpus; run `automixer prepare` first")
    if cfg.proxy.checkpoints:
        return link_checkpoints(cfg, run, log)
    linked = linked_checkpoints(run)
    if linked:
        # Training would resume from, and then prune, files in the user's own directories.
        raise ConfigError(f"proxy.checkpoints: empty, but {run.checkpoints} links your own checkpoints "
                          f"({', '.join(f'{p.name} -> {p.resolve()}' for p in linked[:3])}); a run either links "
                          "checkpoints or trains its own. Use another run.id to train, or set proxy.checkpoints again")

    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()  # per-checkpoint "Writing model shards" bars
    p = cfg.proxy
    ckpt_root = run.checkpoints
    ckpt_root.mkdir(exist_ok=True)
    clean_stale_staging(ckpt_root)
    fingerprint = train_fingerprint(cfg, run)
    existing = list_checkpoints(run)
    for step, path in existing.items():
        got = (read_marker(path) or {}).get("train")
        if got is not None and got != fingerprint:
            raise ConfigError(f"{path} was trained with other proxy settings or another prepared corpus; "
                              "use another run.id, or delete the run's checkpoints/ to retrain")
    if p.max_steps in existing:
        log(f"proxy already trained to step {p.max_steps}; nothing to do")
        return existing

    tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer))
    tokens = build_token_stream(run, tokenizer, log)
    data = PackedBatches(tokens, p.seq_len, p.batch_size, cfg.run.seed)
    device = pick_device(p.device)

    resumable = [s for s, path in existing.items() if (path / TRAINER_STATE).is_file() and not path.is_symlink()]
    torch.manual_seed(cfg.run.seed)
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
                                 f"({type(e).__name__}: {e}); delete the run's checkpoints/ to retrain") from None
        log(f"resuming from step {start} ({existing[start]})")
    n_params = sum(w.numel() for w in model.parameters())
    log(f"proxy '{p.preset}': {n_params:,} parameters, {len(tokens):,} corpus tokens, "
        f"{data.n_windows:,} sequences of {p.seq_len}; training steps {start + 1}..{p.max_steps} on {device}")

    log_path = run.proxy / "train_log.jsonl"
    _truncate_log(log_path, start)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else _null()
    bar = _progress(start, p.max_steps)
    tokens_per_step = p.batch_size * p.grad_accum * p.seq_len
    t_last, steps_since = time.perf_counter(), 0
    loss_sum = 0.0
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
            raise AutomixerError(f"training loss is {step_loss} at step {step}; lower proxy.lr")
        loss_sum += step_loss
        steps_since += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
        if step % p.log_every == 0 or step == p.max_steps:
            now = time.perf_counter()
            entry = {"step": step, "loss": loss_sum / steps_since, "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": tokens_per_step * steps_since / (now - t_last)}
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if bar is None:
                log(f"step {step:>6}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                    f"{entry['tokens_per_s']:,.0f} tok/s")
            t_last, steps_since, loss_sum = now, 0, 0.0
        if step % p.save_every == 0 or step == p.max_steps:
            _save(run, step, model, tokenizer, optimizer, scheduler, fingerprint, step_loss)
        if stop_after is not None and step - start >= stop_after:
            break
    if bar is not None:
        bar.close()
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
        raise AutomixerError(f"{path}: not a trainer state train-proxy wrote, or damaged (loaded with "
                             f"weights_only, which refuses arbitrary objects: {first}); delete the run's "
                             "checkpoints/ to retrain") from None
    if not isinstance(state, dict):
        raise AutomixerError(f"{path}: not a trainer state train-proxy wrote; delete the run's checkpoints/ to retrain")
    return state


def linked_checkpoints(run: RunDir) -> list[Path]:
    """The run's checkpoints that are links to a user's own directories (proxy.checkpoints)."""
    return sorted(p for p in run.checkpoints.glob("step-*") if p.is_symlink()) if run.checkpoints.is_dir() else []


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


def _progress(start: int, total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(initial=start, total=total, unit="step", desc="train-proxy")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def link_checkpoints(cfg: Config, run: RunDir, log: Callable[[str], None]) -> dict[int, Path]:
    """Bring-your-own: validate the user's checkpoint dirs and link them as checkpoints/step-<N>.

    Everything is checked before anything in the run changes; the user's directories are only read (the run
    holds symlinks to them, and removes only its own links)."""
    root = run.checkpoints
    trained = sorted(p for p in root.glob("step-*") if not p.is_symlink()) if root.is_dir() else []
    if trained:
        raise ConfigError(f"proxy.checkpoints: given, but {root} holds checkpoints this run trained "
                          f"({', '.join(p.name for p in trained[:3])}); a run either trains or links checkpoints. "
                          "Use another run.id for your own checkpoints")
    run_vocab = _tokenizer_vocab(run.tokenizer, f"{run.tokenizer}")
    sources = {}
    for ref in sorted(cfg.proxy.checkpoints, key=lambda c: c.step):
        src = cfg.resolve(ref.path).resolve()
        where = f"proxy.checkpoints (step {ref.step}): {src}"
        config = check_checkpoint_dir(src, where)
        vocab = config.get("vocab_size")
        if isinstance(vocab, int) and vocab < len(run_vocab):
            raise ConfigError(f"{where}: model vocabulary ({vocab}) is smaller than the run's tokenizer "
                              f"({len(run_vocab)}); set tokenizer.path to the checkpoints' own tokenizer")
        if (src / "tokenizer_config.json").is_file() and _tokenizer_vocab(src, where) != run_vocab:
            raise ConfigError(f"{where}: its tokenizer differs from the run's; set tokenizer.path to the "
                              "checkpoints' own tokenizer so the corpus is tokenized as the model was trained")
        link = root / f"step-{ref.step}"
        if (link.is_symlink() or link.exists()) and link.resolve() != src:
            raise ConfigError(f"{where}: the run already has a different {link}")
        sources[ref.step] = src
    root.mkdir(exist_ok=True)
    listed = {f"step-{s}" for s in sources}
    for old in root.glob("step-*"):
        if old.is_symlink() and old.name not in listed:  # dropped from the config since the last run
            old.unlink()  # the link only, never what it points at
    for step, src in sources.items():
        link = root / f"step-{step}"
        if link.is_symlink() and link.resolve() == src:
            continue
        tmp = root / f".staging-link-{step}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(src, target_is_directory=True)
        os.replace(tmp, link)
    found = list_checkpoints(run)
    log(f"using {len(found)} existing checkpoint(s): steps {', '.join(map(str, found))}")
    return found


def _tokenizer_vocab(path: Path, where: str) -> dict:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False).get_vocab()
    except Exception as e:  # transformers raises OSError, ValueError, ... for a broken tokenizer directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: cannot load its tokenizer: {first}") from None
