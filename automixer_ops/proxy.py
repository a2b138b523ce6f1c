"""`automixer train-proxy`: the simulation run whose checkpoints become the samplers.

The corpus is packed into one token stream (EOS after each document) and cut into windows of
seq_len tokens; each epoch visits the windows in a seeded permutation, so a batch is a pure
function of (seed, step). The loop, checkpoints and exact resume are trainer.py's, shared
with `train-target`.

Or, with `proxy.checkpoints`, the user's own checkpoints are linked into the run instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from automixer_ops.checkpoints import check_checkpoint_dir, list_checkpoints
from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.rundir import RunDir, read_marker, replace_link
from automixer_ops.trainer import (PRESETS, TrainJob, checked_checkpoints, load_trainer_state,  # noqa: F401
                                   model_config, pack_documents, settings_fingerprint, train)

# ---------------------------------------------------------------- packed token stream


def build_token_stream(run: RunDir, tokenizer, log: Callable[[str], None]) -> np.memmap:
    """All corpus documents as one token array (EOS after each), nanoGPT-style, on disk."""
    corpus = read_marker(run.corpus)["fingerprint"]
    return pack_documents(run.corpus_shards(), run.proxy, tokenizer, {"corpus": corpus}, log)  # (tokenizer: the run's)


class PackedBatches:
    """Batch b of step s is a pure function of (seed, s): resuming needs no data state.

    The stream is cut into windows of seq_len tokens; each epoch visits all windows in a
    seeded permutation.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_windows, self.n_tokens = len(tokens) // seq_len, len(tokens)
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

def train_fingerprint(cfg: Config, run: RunDir) -> dict:
    """What the weights depend on: proxy settings, seed and the prepared corpus."""
    return {"proxy": settings_fingerprint(cfg.proxy), "seed": cfg.run.seed,
            "corpus": read_marker(run.corpus)["fingerprint"]}


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
    from transformers import AutoTokenizer

    fingerprint = train_fingerprint(cfg, run)
    hint = "use another run.id, or delete the run's checkpoints/ to retrain"
    # Before packing the corpus: a refusal should be quick.
    existing = checked_checkpoints(run, fingerprint, f"other proxy settings or another prepared corpus; {hint}")
    if cfg.proxy.max_steps in existing:
        log(f"proxy already trained to step {cfg.proxy.max_steps}; nothing to do")
        return existing
    tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer))
    tokens = build_token_stream(run, tokenizer, log)
    data = PackedBatches(tokens, cfg.proxy.seq_len, cfg.proxy.batch_size, cfg.run.seed)
    job = TrainJob(name="train-proxy", run=run, settings=cfg.proxy, seed=cfg.run.seed, data=data, tokenizer=tokenizer,
                   fingerprint=fingerprint, log_path=run.proxy / "train_log.jsonl", retrain_hint=hint)
    return train(job, log, stop_after)


def linked_checkpoints(run: RunDir) -> list[Path]:
    """The run's checkpoints that are links to a user's own directories (proxy.checkpoints)."""
    return sorted(p for p in run.checkpoints.glob("step-*") if p.is_symlink()) if run.checkpoints.is_dir() else []


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
        replace_link(link, src)
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
