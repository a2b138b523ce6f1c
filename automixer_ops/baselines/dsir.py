"""DSIR (Xie et al., 2023) importance weights with the `data-selection` package's hashed n-gram features.

Raw = the corpus documents (read from the shards in order), target = the tasks' validation pairs
(context + continuation, one example each). The package fits the bag-of-hashed-n-gram models of
both (`fit_importance_estimator(num_tokens_to_fit="all")`, the raw model on the whole corpus) and
writes each document's log importance weight log p_target(x) - log p_raw(x) under its cache_dir.
Documents with fewer words than `min_example_length` (the package's own word count) get importance
0 (log weight -inf): they are never drawn. The resampling is not the package's (it counts documents
and uses numpy's global generator): baselines draw tokens with Gumbel-top-k on these log weights.
"""

from __future__ import annotations

import json
import shutil
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np

from automixer_ops.baselines.common import CorpusIndex, _first_line
from automixer_ops.errors import AutomixerError
from automixer_ops.progress import heartbeat


def package_version() -> str:
    import data_selection

    return data_selection.__version__


def target_texts(pairs_by_task: dict[str, list[dict]]) -> list[str]:
    return [p["context"] + p["continuation"] for pairs in pairs_by_task.values() for p in pairs]


def importance_weights(index: CorpusIndex, targets: list[str], ngrams: int, num_buckets: int,
                       min_example_length: int, work_parent: Path, log: Callable[[str], None]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(log importance weight, word count) of each document of `index`, in its order; -inf for dropped ones.
    The package's intermediate files live in a fresh directory under `work_parent`, removed afterwards."""
    import data_selection.base as ds_base
    import data_selection.hashed_ngram_dsir as ds_ngram
    from data_selection import HashedNgramDSIR

    work = work_parent / f".dsir-work-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        target_file = work / "target.jsonl"
        with open(target_file, "w", encoding="utf-8") as f:
            for text in targets:
                f.write(json.dumps({"text": text}) + "\n")
        dsir = HashedNgramDSIR(raw_datasets=[str(p) for p in index.shards], target_datasets=[str(target_file)],
                               cache_dir=str(work / "cache"), raw_load_dataset_fn=_read_shard, num_proc=1,
                               ngrams=ngrams, num_buckets=num_buckets, tokenizer="wordpunct",
                               min_example_length=min_example_length)
        with ExitStack() as stack:  # the package's progress bars would garble the step's log
            for module in (ds_base, ds_ngram):
                stack.enter_context(mock.patch.object(module, "tqdm", _quiet))
            beat = stack.enter_context(heartbeat("dsir", f"fitting the n-gram models on {len(index):,} documents"))
            dsir.fit_importance_estimator(num_tokens_to_fit="all")
            beat.log_through(log)(f"dsir: fitted {num_buckets:,}-bucket {ngrams}-gram models on {len(targets):,} "
                                  "target examples")
            beat.doing("computing the importance weights")
            dsir.compute_importance_weights()
        # num_proc=1: one virtual shard per corpus shard, saved as <overall_idx>.npy in the shards' order
        logw = np.concatenate([np.load(dsir.log_importance_weights_dir / f"{i}.npy").reshape(-1)
                               for i in range(len(index.shards))]).astype(np.float64)
        words = np.concatenate([np.load(dsir.perexample_metadata_dir / f"{i}.npy").reshape(-1)
                                for i in range(len(index.shards))])
        if len(logw) != len(index) or len(words) != len(index):
            raise AutomixerError(f"{index.shards[0].parent}: the shards changed while they were read; rerun")
        kept = np.asarray(dsir.perexample_metadata_filter(words), dtype=bool)
        logw[~kept] = -np.inf
        return logw, words.astype(np.int64)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def gumbel_order(logw: np.ndarray, rng: np.random.Generator):
    """A pass's draw order: candidates by descending log w + Gumbel noise (sampling without replacement in
    proportion to w), ties by position."""
    def order(candidates: np.ndarray) -> np.ndarray:
        keys = logw[candidates] + rng.gumbel(size=len(candidates))
        return candidates[np.argsort(-keys, kind="stable")]
    return order


def _read_shard(path: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
            for text in batch.column(0).to_pylist():
                yield {"text": text}
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise AutomixerError(f"{path}: not a readable corpus shard ({_first_line(e)})") from None


def _quiet(iterable=None, *args, **kwargs):
    return iterable
