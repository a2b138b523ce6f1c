"""`automixer evaluate`: lm-evaluation-harness on every checkpoint for every target task.

Per checkpoint the results go to `eval/steps/step-<N>.parquet` (atomic), stamped with a
fingerprint of the task setup; a rerun evaluates only the checkpoints without a matching
file, so a killed evaluation resumes at the checkpoint it was on. The per-step files are
then combined into `eval/benchmark.parquet` (step, task, metric, value, stderr, n_docs).

The same step writes each task's influence validation set, `valsets/<task>.jsonl`: the
first `influence.val_docs_per_task` documents as lm-eval's own (context, continuation).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

from automixer_ops.checkpoints import (checkpoint_identity, checkpoint_tokenizer_dir, list_checkpoints,
                                       load_causal_lm, pick_device)
from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import (SUCCESS, RunDir, atomic_write, atomic_write_text, fingerprint, parquet_metadata,
                                  write_marker)
from automixer_ops.samplers import METRIC_PREFERENCE
from automixer_ops.tasks import load_tasks, validation_pairs, write_task_yamls

COLUMNS = ("step", "task", "metric", "value", "stderr", "n_docs")
SKIP_KEYS = {"name", "alias", "sample_len", " ", ""}


def _quiet_libraries() -> None:
    """lm-eval, datasets and transformers log per batch; keep the step's output readable.

    Off a terminal (Airflow logs, CI) lm-eval's request bars are turned off too: it passes
    `disable=False` explicitly, which beats TQDM_DISABLE, so its modules' `tqdm` is wrapped.
    """
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not sys.stderr.isatty():
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
    payload = {"tasks": cfg.tasks.names(), "limit": cfg.evaluate.limit, "yamls": files,
               "lm_eval": getattr(lm_eval, "__version__", "?"), "data_dir": cfg.to_dict()["tasks"]["data_dir"]}
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
    setup = write_task_yamls(cfg, run.eval / "tasks")
    setup_fp = eval_fingerprint(cfg, setup.include_path)
    tasks = load_tasks(setup)
    write_validation_sets(cfg, run, tasks, log)

    steps_dir = run.eval / "steps"
    steps_dir.mkdir(parents=True, exist_ok=True)
    for step, ckpt in checkpoints.items():
        out = steps_dir / f"step-{step}.parquet"
        stamp = f"{setup_fp}-{checkpoint_identity(ckpt)}"
        if out.exists() and parquet_metadata(out).get("fingerprint") == stamp:
            log(f"step {step}: already evaluated")
            continue
        rows = evaluate_checkpoint(cfg, ckpt, tasks, step)
        table = pa.Table.from_pylist(rows, schema=_schema()).replace_schema_metadata({"fingerprint": stamp})
        atomic_write(out, lambda tmp: pq.write_table(table, tmp))
        summary = ", ".join(f"{r['task']} {r['value']:.3f}" for r in rows if r["metric"] == _headline(rows, r["task"]))
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
    return next((m for m in METRIC_PREFERENCE if m in metrics), sorted(metrics)[0])


def evaluate_checkpoint(cfg: Config, ckpt: Path, tasks: dict, step: int) -> list[dict]:
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    device = pick_device(cfg.evaluate.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    run = RunDir(cfg.run_dir)
    model = load_causal_lm(ckpt, dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_tokenizer_dir(run, ckpt)))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.evaluate.batch_size, device=device)
    result = simple_evaluate(model=lm, tasks=list(tasks.values()), limit=cfg.evaluate.limit, num_fewshot=0,
                             log_samples=False, bootstrap_iters=1000, random_seed=cfg.run.seed,
                             numpy_random_seed=cfg.run.seed, torch_random_seed=cfg.run.seed,
                             fewshot_random_seed=cfg.run.seed, verbosity="ERROR")
    rows = []
    for task, metrics in sorted(result["results"].items()):
        n_docs = int(metrics.get("sample_len") or result.get("n-samples", {}).get(task, {}).get("effective", 0))
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
    return rows


def write_validation_sets(cfg: Config, run: RunDir, tasks: dict, log: Callable[[str], None]) -> None:
    out = run.valsets
    n = cfg.influence.val_docs_per_task
    (out / SUCCESS).unlink(missing_ok=True)
    for name, task in tasks.items():
        pairs = validation_pairs(task, n)
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    write_marker(out, {"val_docs_per_task": n})  # `score` checks it against the config
    log(f"validation sets: {len(tasks)} task(s) x up to {n} documents in {out}")
