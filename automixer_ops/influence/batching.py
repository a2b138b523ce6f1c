"""Token sequences -> padded `Batch`es, grouped by length so little compute goes to padding; and the token
sequence of a (context, gold continuation) pair, shared by the influence validation loss and evaluate's
gold_ll so that the two are the same quantity."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from automixer_ops.influence.grads import Batch


def make_batch(seqs: Sequence[Sequence[int]], first_target: Sequence[int], pad_id: int = 0) -> Batch:
    """Right-padded batch; sample i's loss is the mean CE of tokens seqs[i][first_target[i]:].

    Right padding keeps every real token's position id and attention exactly as unpadded.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    weight = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, (s, first) in enumerate(zip(seqs, first_target)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
        n = len(s) - first
        if n > 0:
            weight[i, first - 1:len(s) - 1] = 1.0 / n  # position t predicts token t+1
    return Batch(ids, mask, weight)


def pair_sequences(tokenizer, pairs: Sequence[tuple[str, str]], prefix_id: int,
                   max_len: int) -> list[tuple[list[int], int]]:
    """Each (context, continuation) pair as the tokens [prefix_id] + context + continuation (each text tokenized
    on its own, no special tokens) and the index of its first scored token (`make_batch`'s first_target).

    Cut from the left to `max_len` tokens, as lm-eval does: every kept token follows its real predecessors, and a
    continuation longer than the window keeps its last max_len - 1 tokens. A continuation that tokenizes to
    nothing gives first == len(ids): nothing to score (callers refuse it)."""
    texts = [text for pair in pairs for text in pair]
    enc = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False) if texts else []
    out = []
    for i in range(len(pairs)):
        ctx, cont = enc[2 * i].ids, enc[2 * i + 1].ids
        ids = ([prefix_id] + ctx + cont)[-max_len:]
        out.append((ids, max(1, len(ids) - len(cont)) if cont else len(ids)))
    return out


def validation_sequences(run_dir, tokenizer, task: str, prefix_id: int, max_len: int) -> list[tuple[list[int], int]]:
    """A task's validation pairs (`valsets/<task>.jsonl`, written by `evaluate`) as `pair_sequences` gives them: the
    sequences whose gold-continuation loss DataInf differentiates, the same as evaluate's gold_ll. An empty file, or
    a pair whose continuation tokenizes to nothing, is refused, naming it."""
    from automixer_ops.errors import AutomixerError
    from automixer_ops.tasks import read_validation_set

    pairs = read_validation_set(run_dir, task)
    if not pairs:
        raise AutomixerError(f"{run_dir}/valsets/{task}.jsonl is empty")
    encoded = pair_sequences(tokenizer, [(p["context"], p["continuation"]) for p in pairs], prefix_id, max_len)
    for p, (ids, first) in zip(pairs, encoded):
        if first == len(ids):
            raise AutomixerError(f"valsets/{task}.jsonl document {p.get('doc', '?')}: empty continuation")
    return encoded


def length_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int = 256) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length, each at most `batch_tokens` padded tokens.

    Longest first, so a batch that does not fit in memory fails at the start, not at the end.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and (width * (len(batch) + 1) > batch_tokens or len(batch) >= max_batch):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
