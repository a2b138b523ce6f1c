-- The corpus's checksum of (id, n_tokens) pairs mixed with their (shard, row), as
-- score_stats.position_checksum computes it for each sampler:
-- equal for a sampler whose score files list the corpus's ids in the corpus's own shards and
-- order (as `automixer score` writes them), so that regroup may join them by position.
SELECT coalesce(sum(xor(hash(id, CAST(n_tokens AS BIGINT)), hash(CAST(file_index AS BIGINT), CAST(file_row_number AS BIGINT)))::HUGEINT), 0)
FROM read_parquet($corpus_files);
