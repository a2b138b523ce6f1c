"""Influence scoring: DataInf on the input-embedding and output layers (DESIGN §2).

grads     per-sample gradient statistics of a batch (norms, dots, weighted sums)
datainf   the DataInf fit (lambda, r) and utilities on in-memory batches
batching  token sequences -> padded batches grouped by length
score     the `automixer score` step: validation gradient, streamed fit passes, shard scoring
"""
