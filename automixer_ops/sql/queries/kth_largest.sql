-- The k-th largest utility of one sampler, by selection, not by sorting: quantile_disc at
-- q = (n - k + 1) / n is the (n - k + 1)-th smallest value (DuckDB's discrete quantile is the
-- ceil(q * n)-th; q is bound as a DECIMAL so the index is computed in integers). Run once per
-- sampler on its own files: an exact quantile holds its n values (8 bytes a document) in memory,
-- one sampler at a time stays within regroup.memory_limit where all at once would not.
SELECT quantile_disc(CAST(utility AS DOUBLE), $keep_quantile) FROM read_parquet($step_files);
