"""Perplexity of every corpus document under a reference checkpoint (the `ppl` baseline's scores).

Each document is scored as the sequence [EOS] + its first max_seq_len - 1 tokens (EOS is the run
tokenizer's document separator and BOS; the same window `automixer score` uses): nll = the mean
next-token negative log-likelihood of those document tokens (nats), ppl = exp(nll). A document of
no tokens has none to predict: its nll is NaN and it belongs to no band. float32, no gradients,
batches of similar length of at most `influence.batch_tokens` padded tokens, on
`influence.device` ('auto': CUDA when present).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from automixer_ops.baselines.common import CorpusIndex, _first_line
from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.progress import Progress, quiet_library_bars
from automixer_ops.rundir import RunDir

SEQUENCE = "[EOS] + the document's first max_seq_len - 1 tokens; nll: mean next-token NLL of the document tokens"


def perplexities(run: RunDir, cfg: Config, ckpt: Path, index: CorpusIndex,
                 log: Callable[[str], None]) -> np.ndarray:
    """Mean next-token NLL of each document of `index` (in its order) under the checkpoint."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from automixer_ops.checkpoints import checkpoint_tokenizer_dir, load_causal_lm, pick_device
    from automixer_ops.influence.batching import length_batches, make_batch

    inf = cfg.influence
    device = pick_device(inf.device)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_tokenizer_dir(run, ckpt)))
    quiet_library_bars()  # transformers' "Loading weights" bar, one line of carriage returns in a log
    model = load_causal_lm(ckpt, torch.float32)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and inf.max_seq_len > limit:
        raise ConfigError(f"influence.max_seq_len: {inf.max_seq_len} exceeds the reference model's "
                          f"max_position_embeddings {limit} ({ckpt})")
    model = model.to(device).eval().requires_grad_(False)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if eos is None:
        raise AutomixerError(f"{ckpt}: its tokenizer has neither an eos nor a bos token to start documents with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    keep = inf.max_seq_len - 1

    nll = np.full(len(index), np.nan, dtype=np.float64)
    row0 = 0
    with Progress(f"ppl ({ckpt.name})", len(index), "doc") as progress:
        log = progress.log_through(log)
        for shard in index.shards:
            try:
                table = pq.read_table(shard, columns=["id", "text"])
            except Exception as e:
                raise AutomixerError(f"{shard}: not a readable corpus shard ({_first_line(e)})") from None
            texts = table.column("text").to_pylist()
            enc = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            seqs = [[eos] + e.ids[:keep] for e in enc]
            scored = [i for i, s in enumerate(seqs) if len(s) >= 2]
            with torch.no_grad():
                for batch_idx in length_batches([len(seqs[i]) for i in scored], inf.batch_tokens):
                    rows = [scored[j] for j in batch_idx]
                    batch = make_batch([seqs[r] for r in rows], [1] * len(rows), pad).to(device)
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
                    ce = torch.nn.functional.cross_entropy(
                        logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
                    # loss_weight[b, t] = 1/n weights the prediction of token t+1 at position t: the mean
                    doc_nll = (ce * batch.loss_weight[:, :-1]).sum(dim=1).double().cpu().numpy()
                    nll[row0 + np.asarray(rows)] = doc_nll
                    progress.update(len(rows), tokens=sum(len(seqs[r]) - 1 for r in rows))
            row0 += len(texts)
            progress.update(len(texts) - len(scored))  # documents of no tokens: nothing to score
            log(f"ppl: {row0:,}/{len(index):,} documents scored")
    if row0 != len(index):
        raise AutomixerError(f"{run.corpus}: the shards changed while they were read; rerun")
    return nll


def band_rows(ids, ppl: np.ndarray, band: str, fraction: float, where: str) -> tuple[np.ndarray, dict]:
    """The band's document indices (into `ids`, an Arrow string array) and the facts of its cut: rank by
    perplexity (ties by id), then the lowest / central / highest floor(fraction * n) of the n scored documents."""
    import pyarrow as pa
    import pyarrow.compute as pc

    scored = np.flatnonzero(np.isfinite(ppl))
    n = len(scored)
    k = int(np.floor(fraction * n + 1e-9))
    if k == 0:
        raise AutomixerError(f"{where}.band_fraction: the {band} band ({fraction} of {n} scored document(s)) is "
                             "empty; raise band_fraction or use a larger corpus")
    table = pa.table({"ppl": ppl[scored], "id": ids.take(pa.array(scored))})
    ranked = scored[pc.sort_indices(table, sort_keys=[("ppl", "ascending"), ("id", "ascending")]).to_numpy()]
    start = {"low": 0, "middle": (n - k) // 2, "high": n - k}[band]
    rows = ranked[start:start + k]
    facts = {"band": band, "band_fraction": fraction, "band_documents": k, "scored_documents": n,
             "unscored_documents": int(len(ppl) - n),
             "thresholds": {"rank_from": start, "rank_to": start + k, "ppl_min": float(ppl[rows[0]]),
                            "ppl_max": float(ppl[rows[-1]]),
                            "corpus_ppl_median": float(np.median(ppl[scored]))}}
    return rows, facts
