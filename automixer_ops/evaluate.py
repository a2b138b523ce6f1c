"""`automixer evaluate`: lm-evaluation-harness on every checkpoint for every target task.

Each checkpoint is scored on the `tasks.docs.selection` documents of every task: lm-eval's
metrics, and `gold_ll`, the mean per-token log-likelihood of the gold continuation given the
context (higher is better; per document its continuation's summed log-prob / its token count,
tokenized exactly as the influence step's validation loss: the same quantity), with
stderr = std over documents / sqrt(n).

Per checkpoint the results go to `eval/steps/step-<N>.parquet` (atomic), stamped with a
fingerprint of the task setup; a rerun evaluates only the checkpoints without a matching
file, so a killed evaluation resumes at the checkpoint it was on. The per-step files are
then combined into `eval/benchmark.parquet` (step, task, metric, value, stderr, n_docs).

The same step writes each task's influence validation set, `valsets/<task>.jsonl`: the
`tasks.docs.validation` documents as lm-eval's own (context, continuation), and counts the gold
pairs that sit in two uses of a task's documents (duplicate benchmark items) in the log and in
the valsets' marker. `evaluate_model` scores one model (a target model of an experiment) on the
selection or the test documents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Literal

from automixer_ops.checkpoints import (checkpoint_identity, checkpoint_tokenizer_dir, list_checkpoints,
                                       load_causal_lm, pick_device)
from automixer_ops.config import DOC_USES, Config
from automixer_ops.errors import AutomixerError
from automixer_ops.progress import Progress, heartbeat, progress_mode
from automixer_ops.rundir import (SUCCESS, RunDir, atomic_write, atomic_write_text, fingerprint, parquet_metadata,
                                  write_marker)
from automixer_ops.samplers import headline_metric
from automixer_ops.tasks import cross_use_duplicates, doc_ranges, load_checked_tasks, validation_pairs

COLUMNS = ("step", "task", "metric", "value", "stderr", "n_docs")
SKIP_KEYS = {"name", "alias", "sample_len", " ", ""}
GOLD_LL = "gold_ll"
GOLD_LL_VERSION = 1  # in the evaluation fingerprint: a change to how gold_ll is computed re-evaluates


def _quiet_libraries() -> None:
    """lm-eval, datasets and transformers log per batch; keep the step's output readable.

    Without progress bars (off a terminal: Airflow logs, CI; or AUTOMIXER_PROGRESS) lm-eval's request
    bars are turned off too: it passes `disable=False` explicitly, which beats TQDM_DISABLE, so its
    modules' `tqdm` is wrapped. The step's own progress lines say how long it has been at it.
    """
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if progress_mode() != "bars":
        import lm_eval.api.model
        import lm_eval.api.task
        import lm_eval.models.huggingface
        from tqdm import tqdm

        def silent(*args, **kwargs):
            return tqdm(*args, **{**kwargs, "disable": True})

        for module in (lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface):
            module.tqdm = silent


def eval_fingerprint(cfg: Config, setup_dir: Path) -> str:
    import lm_eval

    files = sorted((p.name, p.read_text()) for p in setup_dir.glob("*.yaml"))
    payload = {"tasks": cfg.tasks.names(), "selection": list(cfg.tasks.docs.selection), "yamls": files,
               "lm_eval": getattr(lm_eval, "__version__", "?"), "data_dir": cfg.to_dict()["tasks"]["data_dir"],
               GOLD_LL: {"version": GOLD_LL_VERSION, "max_seq_len": cfg.influence.max_seq_len}}
    return fingerprint(payload)


def evaluate(cfg: Config, log: Callable[[str], None] = print, step: int | None = None) -> Path:
    """Evaluate all checkpoints (resuming); returns the path of eval/benchmark.parquet.

    With `step`, evaluate only that checkpoint into eval/steps/step-<N>.parquet and return
    its path (one mapped Airflow task per checkpoint); a later call without `step` skips the
    checkpoints already done and combines them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    _quiet_libraries()
    run = RunDir(cfg.run_dir)
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        raise AutomixerError(f"{run.path}/checkpoints: no checkpoint; run `automixer train-proxy` first")
    only = step
    if only is not None:
        if only not in checkpoints:
            raise AutomixerError(f"{run.path}/checkpoints: no checkpoint at step {only} "
                                 f"(have {', '.join(map(str, checkpoints))})")
        checkpoints = {only: checkpoints[only]}
    check_custom_tasks_fit(cfg, run, checkpoints)
    setup, tasks, ranges = load_checked_tasks(cfg, run.eval / "tasks")  # every range checked before writing
    setup_fp = eval_fingerprint(cfg, setup.include_path)
    pairs = write_validation_sets(cfg, run, tasks, ranges, log)

    steps_dir = run.eval / "steps"
    steps_dir.mkdir(parents=True, exist_ok=True)
    with Progress("evaluate", total=len(checkpoints), unit="checkpoint") as progress:
        log = progress.log_through(log)
        for step, ckpt in checkpoints.items():
            out = steps_dir / f"step-{step}.parquet"
            stamp = f"{setup_fp}-{checkpoint_identity(ckpt)}"
            if out.exists() and parquet_metadata(out).get("fingerprint") == stamp:
                log(f"step {step}: already evaluated")
                progress.skip(1)
                continue
            rows = evaluate_checkpoint(cfg, ckpt, tasks, step, docs=ranges["selection"], pairs=pairs["selection"],
                                       progress=progress)
            write_rows(out, rows, stamp)
            progress.update(1)
            summary = ", ".join(f"{r['task']} {r['value']:.3f}" for r in rows
                                if r["metric"] == _headline(rows, r["task"]))
            log(f"step {step}: {summary}")
    if only is not None:
        return steps_dir / f"step-{only}.parquet"

    # Combine the checkpoints the run has now (a stale step file of a removed checkpoint is left out).
    tables = [pq.read_table(steps_dir / f"step-{s}.parquet") for s in checkpoints]
    combined = pa.concat_tables(tables).replace_schema_metadata(None).sort_by([("step", "ascending"),
                                                                                ("task", "ascending"),
                                                                                ("metric", "ascending")])
    final = run.benchmark
    atomic_write(final, lambda tmp: pq.write_table(combined, tmp))
    return final


def check_custom_tasks_fit(cfg: Config, run: RunDir, checkpoints: dict[int, Path]) -> None:
    """Every custom continuation (or choice) fits each model's context: lm-eval asserts it in the middle of a run
    (a traceback); here it is one line naming the file and line, before anything is written. Lines that are not
    valid JSON are left to write_task_yamls, which names them."""
    from transformers import AutoTokenizer

    if not cfg.tasks.custom:
        return
    contexts: dict[tuple[Path, int], int] = {}  # (tokenizer dir, context) -> a step that has them
    for step, ckpt in checkpoints.items():
        contexts.setdefault((checkpoint_tokenizer_dir(run, ckpt), _context_length(ckpt)), step)
    for (tok_dir, limit), step in contexts.items():
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        for task in cfg.tasks.custom:
            path = cfg.resolve(task.path).resolve()
            for lineno, doc in _json_lines(path):
                targets = doc.get("choices") if isinstance(doc.get("choices"), list) else [doc.get("continuation")]
                for text in (t for t in targets if isinstance(t, str)):
                    n = len(tokenizer(" " + text if "choices" in doc else text, add_special_tokens=False)["input_ids"])
                    if n > limit:
                        raise AutomixerError(f"{path}:{lineno}: a continuation of {n} tokens does not fit the "
                                             f"context of checkpoint step {step} ({limit} tokens); shorten it")


def _context_length(ckpt: Path) -> int:
    """The model context lm-eval's HFLM uses: the config's position limit, else 2048 (its default)."""
    try:
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 2048
    return next((int(config[k]) for k in ("n_positions", "max_position_embeddings", "n_ctx")
                 if isinstance(config.get(k), int)), 2048)


def _json_lines(path: Path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return
    for lineno, line in enumerate(lines, 1):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            yield lineno, doc


def _schema():
    import pyarrow as pa

    return pa.schema([("step", pa.int64()), ("task", pa.string()), ("metric", pa.string()),
                      ("value", pa.float64()), ("stderr", pa.float64()), ("n_docs", pa.int64())])


def _headline(rows: list[dict], task: str) -> str:
    metrics = {r["metric"] for r in rows if r["task"] == task}
    return headline_metric(metrics) or sorted(metrics)[0]


def write_rows(path: Path, rows: list[dict], stamp: str) -> None:
    """Benchmark rows (step, task, metric, value, stderr, n_docs) as Parquet, stamped with what they were
    measured on (read back with parquet_metadata(path)["fingerprint"]); written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=_schema()).replace_schema_metadata({"fingerprint": stamp})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def evaluate_model(cfg: Config, ckpt: Path, use: Literal["selection", "test"], step: int = 0,
                   setup_dir: Path | None = None) -> list[dict]:
    """lm-eval + gold_ll of one model on the `use` range of every target task; rows as evaluate_checkpoint's.

    `ckpt`: a save_pretrained directory (model, and its tokenizer files; without them the run's tokenizer), inside
    the run or not. The generated task YAMLs go to `setup_dir` (default: the run's eval/tasks). Nothing else is
    written: the rows are returned, labelled with `step`."""
    if use not in ("selection", "test"):
        raise ValueError(f"evaluate_model: use must be 'selection' or 'test', got {use!r}")
    _quiet_libraries()
    run = RunDir(cfg.run_dir)
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file():
        raise AutomixerError(f"{ckpt}: not a Hugging Face checkpoint directory (no config.json)")
    if not (checkpoint_tokenizer_dir(run, ckpt) / "tokenizer_config.json").is_file():
        raise AutomixerError(f"{ckpt}: no tokenizer files (tokenizer_config.json) there, and the run has no "
                             f"tokenizer at {run.tokenizer}; save the tokenizer with the model (save_pretrained)")
    check_custom_tasks_fit(cfg, run, {step: ckpt})
    _, tasks, ranges = load_checked_tasks(cfg, Path(setup_dir) if setup_dir is not None else run.eval / "tasks",
                                          (use,))
    return evaluate_checkpoint(cfg, ckpt, tasks, step, use=use, docs=ranges[use])


def evaluate_checkpoint(cfg: Config, ckpt: Path, tasks: dict, step: int, use: str = "selection",
                        docs: dict[str, range] | None = None, pairs: dict[str, list[dict]] | None = None,
                        progress: Progress | None = None) -> list[dict]:
    """lm-eval's metrics and gold_ll of one checkpoint on the `use` documents of each task: rows of the benchmark
    table. `docs` ({task: indices}, doc_ranges) and `pairs` ({task: validation_pairs}) when already made.
    `progress`: the caller's, told what runs now; without one, a heartbeat of its own."""
    if progress is None:
        with heartbeat("evaluate", f"step {step}: loading the model") as beat:
            return evaluate_checkpoint(cfg, ckpt, tasks, step, use, docs, pairs, beat)
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    docs = doc_ranges(cfg, tasks, (use,))[use] if docs is None else docs
    pairs = {name: validation_pairs(task, docs[name]) for name, task in tasks.items()} if pairs is None else pairs
    device = pick_device(cfg.evaluate.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    run = RunDir(cfg.run_dir)
    progress.doing(f"step {step}: loading the model")
    model = load_causal_lm(ckpt, dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_tokenizer_dir(run, ckpt)))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.evaluate.batch_size, device=device)
    # `samples` (lm-eval's own document indices per task) rather than `limit`, which takes the first N only.
    progress.doing(f"step {step}: lm-eval on {len(tasks)} task(s), {sum(map(len, docs.values())):,} documents")
    result = simple_evaluate(model=lm, tasks=list(tasks.values()), samples={t: list(r) for t, r in docs.items()},
                             num_fewshot=0, log_samples=False, bootstrap_iters=1000, random_seed=cfg.run.seed,
                             numpy_random_seed=cfg.run.seed, torch_random_seed=cfg.run.seed,
                             fewshot_random_seed=cfg.run.seed, verbosity="ERROR")
    rows = []
    for task, metrics in sorted(result["results"].items()):
        n_docs = int(metrics.get("sample_len") or result.get("n-samples", {}).get(task, {}).get("effective", 0))
        if task in docs and n_docs != len(docs[task]):
            # lm-eval falls back to every document of a task whose name is not a key of `samples` (a group or an
            # alias): that would score the other uses' documents too.
            raise AutomixerError(f"tasks: lm-eval scored {n_docs} documents of {task!r}, not the {len(docs[task])} "
                                 f"of tasks.docs.{use} {[docs[task].start, docs[task].stop]}; is it a group or "
                                 "an alias? name its tasks one by one")
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if name in SKIP_KEYS or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):  # a likelihood task's perplexity past a float's range: no measurement
                continue
            stderr = metrics.get(f"{name}_stderr,{filter_name}")
            if filter_name not in ("", "none"):  # tasks with several filters report a metric per filter
                name = f"{name},{filter_name}"
            stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
            rows.append({"step": step, "task": task, "metric": name, "value": float(value), "stderr": stderr,
                         "n_docs": n_docs})
    max_len = min(cfg.influence.max_seq_len, _context_length(ckpt))
    for task in sorted(pairs):
        progress.doing(f"step {step}: gold_ll of {task}")
        values = gold_ll_values(model, tokenizer, pairs[task], max_len, cfg.evaluate.batch_size, device, task)
        mean, stderr = mean_and_stderr(values)
        rows.append({"step": step, "task": task, "metric": GOLD_LL, "value": mean, "stderr": stderr,
                     "n_docs": len(values)})
    progress.doing(None)
    return rows


def gold_ll_values(model, tokenizer, pairs: list[dict], max_len: int, batch_size: int, device: str,
                   task: str = "?") -> list[float]:
    """Per (context, continuation) pair: the summed log-probability of its continuation tokens given the context
    over their count. The tokens are the influence validation loss's (`pair_sequences`: the EOS token, the
    context, the continuation, cut from the left to `max_len`), so gold_ll = -(that loss) per document."""
    import torch

    from automixer_ops.influence.batching import length_batches, make_batch, pair_sequences

    prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if prefix is None:
        raise AutomixerError("the tokenizer has neither an EOS nor a BOS token to start a sequence with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
    encoded = pair_sequences(tokenizer, [(p["context"], p["continuation"]) for p in pairs], prefix, max_len)
    for p, (ids, first) in zip(pairs, encoded):
        if first == len(ids):
            raise AutomixerError(f"tasks: {task!r} document {p.get('doc', '?')}: the gold continuation is empty "
                                 "once tokenized; gold_ll has nothing to score")
    values = [math.nan] * len(pairs)
    lengths = [len(ids) for ids, _ in encoded]
    with torch.no_grad():
        for idx in length_batches(lengths, max(lengths, default=1) * batch_size, max_batch=batch_size):
            batch = make_batch([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], pad).to(device)
            scored = batch.loss_weight[:, :-1] != 0  # position t predicts token t+1: the continuation's tokens
            b, t = scored.nonzero(as_tuple=True)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logp = torch.log_softmax(logits[b, t].float(), -1).gather(1, batch.input_ids[b, t + 1, None])[:, 0]
            total = torch.zeros(len(idx), dtype=torch.float64, device=logp.device).index_add_(0, b, logp.double())
            for j, v in zip(idx, (total / scored.sum(1).double()).tolist()):
                values[j] = v
    return values


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error, std over the values (n - 1 in the denominator, as lm-eval's
    stderr of a mean) / sqrt(n); None for a single value."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def write_validation_sets(cfg: Config, run: RunDir, tasks: dict, ranges: dict[str, dict[str, range]],
                          log: Callable[[str], None]) -> dict[str, dict[str, list[dict]]]:
    """valsets/<task>.jsonl from the validation documents; returns every use's gold pairs ({use: {task: pairs}}).

    A gold (context, continuation) pair that sits in two uses of a task's documents (a benchmark's duplicate
    items) is counted, in the log and in the marker, not refused: the embedded benchmarks hold one with the
    default ranges (social_iqa documents 12 and 471, selection and test)."""
    pairs = {use: {name: validation_pairs(task, ranges[use][name]) for name, task in tasks.items()}
             for use in DOC_USES if use in ranges}
    duplicates = cross_use_duplicates(pairs)
    out = run.valsets
    (out / SUCCESS).unlink(missing_ok=True)
    for name in tasks:
        atomic_write_text(out / f"{name}.jsonl",
                          "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs["validation"][name]))
    start, end = cfg.tasks.docs.validation
    write_marker(out, {"validation": [start, end],  # `score` checks it against the config
                       "docs": {use: {t: [r.start, r.stop] for t, r in by_task.items()}
                                for use, by_task in ranges.items()},
                       "content_duplicates": len(duplicates), "content_duplicate_docs": duplicates})
    log(f"validation sets: {len(tasks)} task(s) x documents [{start}, {end}) in {out}")
    if duplicates:
        shown = "; ".join(f"{d['task']} " + " = ".join(f"{u} doc {', '.join(map(str, d[u]))}" for u in DOC_USES
                                                       if u in d) for d in duplicates[:3])
        log(f"content overlap: {len(duplicates)} gold (context, continuation) pair(s) sit in two uses of a task's "
            f"documents ({shown}{'; ...' if len(duplicates) > 3 else ''}); kept, and counted in {out / SUCCESS}")
    return pairs
