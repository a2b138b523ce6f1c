"""`automixer train-target`: a fresh model trained on a mixture, the test of whether the mixture helps.

Any method's `mixture/` (DESIGN §3: `part-*.parquet` with id, group, repeat, text, and
`weights.json` with its token_budget) is packed into one token stream in the mixture's own
order (parts by name, rows in order, EOS after each document), and read front to back in
windows of seq_len: the data order is the mixture's, a pure function of the micro-batch
index, so a killed run resumes exactly. The model trains for the budget's steps,
ceil(token_budget / tokens per step), so every method of an experiment gets the same number
of updates; a mixture that holds fewer tokens than that wraps to its start.

The loop, checkpoints and resume are the proxy's (trainer.py); checkpoints go to
`<out>/checkpoints/step-<N>/`, the loss log to `<out>/train_log.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from automixer_ops.config import ProxySection, TargetSection
from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import RunDir, file_hash, fingerprint
from automixer_ops.trainer import TrainJob, pack_documents, settings_fingerprint, train

MIXTURE_COLUMNS = ("id", "text")


class MixtureBatches:
    """Micro-batch i holds windows i·B .. i·B + B − 1 of the stream, in order, wrapping at its end."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.n_windows, self.n_tokens = len(tokens) // seq_len, len(tokens)
        if self.n_windows < 1:
            raise AutomixerError(f"the mixture holds {len(tokens):,} tokens: less than one sequence of {seq_len}")

    def batch(self, micro_batch_index: int):
        import torch

        first = micro_batch_index * self.batch_size
        rows = [(first + j) % self.n_windows for j in range(self.batch_size)]
        x = np.stack([self.tokens[w * self.seq_len:(w + 1) * self.seq_len] for w in rows]).astype(np.int64)
        return torch.from_numpy(x)


def read_mixture(mixture: Path) -> tuple[list[Path], dict]:
    """The parts and weights.json of a mixture directory, checked: a directory `mix` or a baseline did not
    finish, or another kind of file, fails here with its name."""
    import pyarrow.parquet as pq

    weights = mixture / "weights.json"
    if not mixture.is_dir():
        raise AutomixerError(f"{mixture}: no mixture directory; run `automixer mix` (or the method) first")
    try:
        info = json.loads(weights.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AutomixerError(f"{weights}: not found; {mixture} is not a finished mixture") from None
    except (OSError, ValueError) as e:
        raise AutomixerError(f"{weights}: unreadable ({e})") from None
    budget = info.get("token_budget") if isinstance(info, dict) else None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise AutomixerError(f"{weights}: token_budget: expected an integer >= 1, got {budget!r}")
    parts = sorted(mixture.glob("part-*.parquet"))
    if not parts:
        raise AutomixerError(f"{mixture}: no part-*.parquet files")
    for part in parts:
        try:
            names = pq.read_schema(part).names
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise AutomixerError(f"{part}: not a readable Parquet file ({e})") from None
        missing = [c for c in MIXTURE_COLUMNS if c not in names]
        if missing:
            raise AutomixerError(f"{part}: missing column(s) {', '.join(missing)} (a mixture part holds "
                                 f"{', '.join(MIXTURE_COLUMNS)})")
    return parts, info


def mixture_identity(mixture: Path, parts: list[Path], info: dict) -> str:
    """Which mixture a target trained on. `mix` and the baselines draw deterministically and record what a draw
    depends on (weights.json's mix_id / input_fingerprint): a mixture drawn again from the same inputs is the same
    mixture, so its target resumes, even if a library upgrade changed the parts' bytes. Any other mixture
    directory is known by its content (weights.json and every part's bytes)."""
    drawn = info.get("mix_id") or info.get("input_fingerprint")
    if isinstance(drawn, str) and drawn:
        return fingerprint({"drawn": drawn, "parts": [p.name for p in parts]})
    return fingerprint({"weights": file_hash(mixture / "weights.json"), "parts": [(p.name, file_hash(p)) for p in parts]})


def target_fingerprint(settings: ProxySection, seed: int, mixture_id: str, tokenizer_dir: Path) -> dict:
    """What a target's weights depend on: its settings, seed, the mixture and the tokenizer."""
    return {"target": settings_fingerprint(settings), "seed": seed, "mixture": mixture_id,
            "tokenizer": file_hash(tokenizer_dir / "tokenizer.json")}


def train_target(mixture: Path, out: Path, target: TargetSection, seed: int, tokenizer_dir: Path,
                 log: Callable[[str], None] = print, stop_after: int | None = None) -> dict[int, Path]:
    """Train (or resume) a target model on `mixture` for its token budget; returns its checkpoints by step."""
    from transformers import AutoTokenizer

    parts, info = read_mixture(mixture)
    mixture_id = mixture_identity(mixture, parts, info)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise AutomixerError(f"{tokenizer_dir}: no tokenizer.json; give the run's tokenizer directory")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokens = pack_documents(parts, out / "data", tokenizer, {"mixture": mixture_id}, log)
    settings = target.training(info["token_budget"])
    data = MixtureBatches(tokens, settings.seq_len, settings.batch_size)
    job = TrainJob(name="train-target", run=RunDir(out), settings=settings, seed=seed, data=data,
                   tokenizer=tokenizer, fingerprint=target_fingerprint(settings, seed, mixture_id, tokenizer_dir),
                   log_path=out / "train_log.jsonl",
                   retrain_hint=f"delete {out}/checkpoints to train this target again")
    per_step = settings.seq_len * settings.batch_size * settings.grad_accum
    log(f"train-target: {mixture} ({info.get('tokens')} tokens drawn for a budget of {info['token_budget']:,}) "
        f"-> {out}; {settings.max_steps} steps x {per_step:,} tokens, preset {settings.preset}, seed {seed}")
    return train(job, log, stop_after)
