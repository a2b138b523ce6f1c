"""The run configuration: one YAML file per run, validated on load.

Each section is a dataclass; every field carries its default and a one-line doc
(`automixer config --reference` prints them all, docs/configuration.md is that output).
Loading checks every key against the dataclass fields, so a typo fails with the key's
full path and the keys that are allowed there, instead of being silently ignored.

Relative paths in a config file resolve against the directory of that file, so a run
behaves the same from any working directory (an Airflow worker's is not yours).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from automixer_ops.config_fields import required, setting
from automixer_ops.errors import ConfigError




# Keys that were removed, and where their setting lives now: giving one fails with this line.
MOVED = {
    "evaluate.limit": "moved to tasks.docs.selection (documents [0, limit)); e.g. tasks: {docs: {selection: [0, 100]}}",
    "influence.val_docs_per_task": "moved to tasks.docs.validation (documents [start, start + val_docs_per_task), "
                                   "disjoint from tasks.docs.selection and tasks.docs.test); e.g. tasks: {docs: "
                                   "{validation: [100, 164]}}",
}

MAX_SEED = 2**32 - 1
INT64_MAX = 2**63 - 1  # every integer setting ends up in numpy, torch or DuckDB BIGINT


@dataclass(kw_only=True)
class RunSection:
    id: str = setting("demo", "Run name; the run directory is <root>/<id>. Letters, digits, '.', '_' and '-'.")
    root: str = setting("runs", "Directory that holds run directories.")
    seed: int = setting(0, "Seed for every random choice of the run (sampling, training, mixing).")

    def check(self, where: str) -> None:
        # lm-eval seeds numpy's legacy generator with it (np.random.seed), which takes 32 bits.
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"{where}.seed: must be in [0, {MAX_SEED}] (numpy and lm-eval take 32-bit seeds), "
                              f"got {self.seed}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.id):
            raise ConfigError(f"{where}.id: {self.id!r} is not a valid run id "
                              "(letters, digits, '.', '_' and '-', not starting with a symbol)")


@dataclass(kw_only=True)
class CorpusSection:
    paths: list[str] = required(
        "Corpus inputs: files, directories or glob patterns. JSONL (.jsonl, .json, optionally .gz), "
        "Parquet (.parquet) or a local Hugging Face `datasets` directory (save_to_disk output). Inside a "
        "directory, only .jsonl, .jsonl.gz, .ndjson and .parquet files and `datasets` directories are read.")
    format: Literal["auto", "jsonl", "parquet", "hf_dataset"] = setting(
        "auto", "Input format; 'auto' decides per path from its extension or directory contents.")
    id_field: str = setting("id", "Field holding the document id (string or integer; unique, non-empty).")
    text_field: str = setting("text", "Field holding the document text (string).")
    source_field: str = setting(
        "source", "Field naming the document's source/domain; when a record lacks it, the input file's stem is used.")
    hf_split: str | None = setting(None, "Split to read when a `datasets` directory holds a DatasetDict.")
    empty_text: Literal["skip", "error"] = setting(
        "skip", "What to do with a document whose text is empty or only whitespace: skip it (counted in the "
        "summary) or fail.")
    docs_per_shard: int = setting(10_000, "Documents per corpus/part-*.parquet shard (the unit of parallel scoring).")
    batch_docs: int = setting(1_000, "Documents read, tokenized and written at a time (a batch also ends at 2M characters); bounds prepare's memory.")

    def check(self, where: str) -> None:
        if not self.paths:
            raise ConfigError(f"{where}.paths: give at least one corpus file, directory or glob")
        for name in ("docs_per_shard", "batch_docs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class TokenizerSection:
    path: str | None = setting(
        None, "Local Hugging Face tokenizer directory to use. Empty: train a byte-level BPE on the corpus.")
    vocab_size: int = setting(16_384, "Vocabulary size of the trained BPE tokenizer (special tokens included).")
    min_frequency: int = setting(2, "Minimum pair frequency for a BPE merge.")
    train_max_chars: int = setting(
        500_000_000, "Train the BPE on the corpus' first documents up to this many characters (bounds memory).")
    model_max_length: int = setting(2048, "model_max_length saved with the tokenizer.")

    def check(self, where: str) -> None:
        if self.vocab_size < 260:
            raise ConfigError(f"{where}.vocab_size: must be >= 260 (256 byte symbols + special tokens), "
                              f"got {self.vocab_size}")
        for name in ("min_frequency", "train_max_chars", "model_max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class CheckpointRef:
    step: int = required("Training step the checkpoint was saved at.")
    path: str = required("Hugging Face checkpoint directory (save_pretrained output: config.json + weights).")


@dataclass(kw_only=True)
class TrainingSettings:
    """What the proxy and a target model train with (trainer.py runs both)."""

    preset: Literal["tiny", "25m", "50m", "75m", "350m", "1.5b"] = setting(
        "tiny", "Llama size preset of the model (docs/proxy.md lists each preset's parameter count).")
    seq_len: int = setting(512, "Tokens per packed training sequence.")
    batch_size: int = setting(16, "Sequences per micro-batch.")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    lr: float = setting(3e-3, "Peak learning rate of AdamW.")
    min_lr_ratio: float = setting(0.1, "Cosine decay ends at lr * min_lr_ratio.")
    weight_decay: float = setting(0.1, "AdamW weight decay (matrices only; not norms or biases).")
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this value (0: no clipping).")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "Where to train; 'auto' takes CUDA when present.")
    log_every: int = setting(10, "Log loss and tokens/s every this many steps.")

    def check_training(self, where: str) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{where}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class ProxySection(TrainingSettings):
    max_steps: int = setting(1000, "Optimizer steps of the proxy run.")
    save_every: int = setting(100, "Save a checkpoint every this many steps (and at the last step).")
    warmup_steps: int = setting(100, "Linear warmup steps before the cosine decay.")
    checkpoints: list[CheckpointRef] = setting(
        [], "Bring your own checkpoints: a list of {step, path}. When given, train-proxy trains nothing and "
        "links these into the run.")

    def check(self, where: str) -> None:
        self.check_training(where)
        for name in ("max_steps", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ConfigError(f"{where}.warmup_steps: must be in [0, max_steps={self.max_steps}), "
                              f"got {self.warmup_steps}")
        steps = [c.step for c in self.checkpoints]
        if len(set(steps)) != len(steps):
            raise ConfigError(f"{where}.checkpoints: steps must be distinct, got {steps}")
        if any(s < 0 for s in steps):
            raise ConfigError(f"{where}.checkpoints: steps must be >= 0, got {steps}")


@dataclass(kw_only=True)
class CustomTask:
    name: str = required("Task name, used in tables and plots (letters, digits, '_', '-').")
    path: str = required("JSONL file, one JSON object per line: fields context, choices, gold (multiple choice, "
                         "scored by accuracy) or context, continuation (likelihood only, scored by bits_per_byte of the "
                         "continuation, and perplexity where it is finite; the continuation is appended to the context "
                         "as is, so give it its leading space).")


DOC_USES = ("selection", "validation", "test")


@dataclass(kw_only=True)
class TaskDocs:
    selection: list[int] = setting(
        [0, 100], "Documents [start, end) of each task's evaluation split that `evaluate` scores every checkpoint "
        "on (lm-eval and gold_ll), to choose each task's best checkpoint.")
    validation: list[int] = setting(
        [100, 164], "Documents [start, end) whose (context, gold continuation) loss the influence targets "
        "(written to valsets/<task>.jsonl by `evaluate`).")
    test: list[int] = setting(
        [200, 500], "Held-out documents [start, end): judging target models trained on mixtures (experiments); "
        "never used to choose a checkpoint or to score the corpus.")

    def check(self, where: str) -> None:
        for name in DOC_USES:
            r = getattr(self, name)
            if len(r) != 2 or not 0 <= r[0] < r[1]:
                raise ConfigError(f"{where}.{name}: expected [start, end] with 0 <= start < end, got {r}")
        for i, a in enumerate(DOC_USES):
            for b in DOC_USES[i + 1:]:
                ra, rb = getattr(self, a), getattr(self, b)
                if ra[0] < rb[1] and rb[0] < ra[1]:
                    raise ConfigError(f"{where}.{a} [{ra[0]}, {ra[1]}) and {where}.{b} [{rb[0]}, {rb[1]}) overlap: "
                                      "a document used to choose or to score must not be a test document")


@dataclass(kw_only=True)
class TasksSection:
    targets: list[str] = setting(
        ["arc_easy", "arc_challenge", "boolq", "piqa", "social_iqa", "hellaswag", "openbookqa", "winogrande"],
        "Target tasks by their lm-evaluation-harness names.")
    data_dir: str | None = setting(
        None, "Directory of local copies, <task>/<split>.jsonl, served through lm-eval's own task YAMLs. "
        "null: lm-eval loads each task the usual way (from the Hugging Face hub).")
    custom: list[CustomTask] = setting([], "Your own target tasks from JSONL files, in addition to targets.")
    docs: TaskDocs = setting(
        TaskDocs(), "The three uses of each task's documents, as disjoint index ranges [start, end) into its "
        "evaluation split: selection, validation, test. A range past a task's documents is clipped; one that "
        "leaves a task no document is an error.")

    def check(self, where: str) -> None:
        names = self.names()
        if not names:
            raise ConfigError(f"{where}: give at least one target or custom task")
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: task names must be distinct, got {names}")
        for t in self.custom:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", t.name):
                raise ConfigError(f"{where}.custom: {t.name!r} is not a valid task name")
        self.docs.check(f"{where}.docs")

    def names(self) -> list[str]:
        return list(self.targets) + [t.name for t in self.custom]


@dataclass(kw_only=True)
class EvaluateSection:
    batch_size: int = setting(32, "lm-eval batch size (requests per forward pass).")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "Where to evaluate; 'auto' takes CUDA when present.")

    def check(self, where: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class SelectSection:
    metric: Literal["auto", "acc", "acc_norm", "gold_ll"] = setting(
        "auto", "Metric that picks each task's best checkpoint. 'auto': acc_norm where a task reports it, else acc, "
        "else bits_per_byte / perplexity (likelihood-only tasks, lower is better). 'acc' or 'acc_norm': that "
        "metric where a task reports it, else as 'auto'. 'gold_ll': the mean per-token log-likelihood of the "
        "gold continuation (continuous, less noisy; every task has it).")
    noise_z: float = setting(
        1.0, "Table 1 flags a best step as 'within noise' of the last step when abs(best - last) <= noise_z * "
        "sqrt(stderr_best^2 + stderr_last^2), as 'separated' when it is more.")

    def check(self, where: str) -> None:
        if self.noise_z < 0:
            raise ConfigError(f"{where}.noise_z: must be >= 0, got {self.noise_z}")


@dataclass(kw_only=True)
class InfluenceSection:
    max_seq_len: int = setting(
        512, "Score each document on its first max_seq_len tokens (EOS + max_seq_len - 1 document tokens); "
        "its n_tokens stays the full length.")
    fit_samples: int | None = setting(
        None, "Fit lambda and r on a seeded uniform subsample of this many documents; null: the whole corpus "
        "(exact DataInf, one more read of the corpus). Changes the scores, so keep it in the run's config.")
    batch_tokens: int = setting(8192, "Padded tokens per scoring batch (documents are grouped by length).")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "Where to score; 'auto' takes CUDA when present.")
    precision: Literal["fp32", "bf16"] = setting(
        "fp32", "Model body precision: fp32, or bf16 autocast on GPU. Gradient statistics are fp32 and the "
        "fit's sums fp64 either way.")
    norm_mode: Literal["auto", "explicit", "ghost"] = setting(
        "auto", "How per-document output-layer gradient norms are formed: built per document in vocabulary "
        "chunks (explicit), from token Gram matrices (ghost), or whichever costs fewer FLOPs (auto).")

    def check(self, where: str) -> None:
        if self.batch_tokens < 1:
            raise ConfigError(f"{where}.batch_tokens: must be >= 1, got {self.batch_tokens}")
        if self.max_seq_len < 2:
            raise ConfigError(f"{where}.max_seq_len: must be >= 2, got {self.max_seq_len}")
        if self.fit_samples is not None and self.fit_samples < 1:
            raise ConfigError(f"{where}.fit_samples: must be >= 1 or null, got {self.fit_samples}")


@dataclass(kw_only=True)
class RegroupSection:
    keep_fraction: float = setting(0.5, "Per sampler, keep the top ceil(keep_fraction * n) documents by utility, "
                                        "ties at the cut broken by id (paper Appendix B's filtered table F_j).")
    joint: Literal["kept", "all"] = setting(
        "kept", "Joint score J: 'kept' sums alpha_j * u_j over the samplers whose filtered table holds the document "
        "and min-max scales over their union (paper Appendix B); 'all' sums over every sampler and scales over "
        "the whole corpus (the paper's main text).")
    memory_limit: str = setting("4GB", "DuckDB memory_limit while regrouping and mixing; past it DuckDB spills to "
                                       "<run>/.duckdb_tmp, so any number of scores fits (e.g. '16GB', '80%').")

    def check(self, where: str) -> None:
        if not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"{where}.keep_fraction: must be in (0, 1], got {self.keep_fraction}")


@dataclass(kw_only=True)
class GroupCap:
    group: str = required("Group name as in the weights table (step-<N>).")
    max_tokens: int = required("At most this many tokens from the group.")


@dataclass(kw_only=True)
class MixSection:
    token_budget: int = setting(100_000_000, "Tokens T in the training mixture.")
    max_repeats: int = setting(
        3, "How many times a group may start again from its top document once it is used up "
        "(0: every document at most once per group). Up to 4 passes costs little (Muennighoff et al. 2023).")
    caps: list[GroupCap] = setting([], "Per-group token caps: a list of {group, max_tokens}.")
    docs_per_part: int = setting(100_000, "Documents per mixture/part-*.parquet file.")
    underfill: Literal["error", "allow"] = setting(
        "error", "A token_budget above what the groups can give (their tokens x (1 + max_repeats), or their caps): "
        "'error' stops before drawing and says by how much; 'allow' draws everything the groups can give, and "
        "the mixture, weights.json and the report say that it falls short.")

    def check(self, where: str) -> None:
        if self.token_budget < 1 or self.max_repeats < 0 or self.docs_per_part < 1:
            raise ConfigError(f"{where}: token_budget and docs_per_part must be >= 1, max_repeats >= 0")
        if any(c.max_tokens < 0 for c in self.caps):
            raise ConfigError(f"{where}.caps: max_tokens must be >= 0")


@dataclass(kw_only=True)
class TargetSection(TrainingSettings):
    warmup_fraction: float = setting(0.1, "Linear warmup over this fraction of the steps.")
    checkpoints: int = setting(2, "Checkpoints kept over the run (evenly spaced; the last is evaluated).")

    def check(self, where: str) -> None:
        self.check_training(where)
        if self.checkpoints < 1:
            raise ConfigError(f"{where}.checkpoints: must be >= 1, got {self.checkpoints}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"{where}.warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")

    def steps(self, token_budget: int) -> int:
        """Optimizer steps that read the budget once (the last batch may wrap to the mixture's start)."""
        per_step = self.seq_len * self.batch_size * self.grad_accum
        return max(1, -(-token_budget // per_step))

    def training(self, token_budget: int) -> ProxySection:
        """The trainer's settings for this budget (the trainer is train-proxy's)."""
        steps = self.steps(token_budget)
        save_every = max(1, -(-steps // self.checkpoints))
        warmup = min(steps - 1, round(self.warmup_fraction * steps)) if steps > 1 else 0
        return ProxySection(preset=self.preset, seq_len=self.seq_len, batch_size=self.batch_size,
                            grad_accum=self.grad_accum, max_steps=steps, save_every=save_every, lr=self.lr,
                            min_lr_ratio=self.min_lr_ratio, warmup_steps=warmup, weight_decay=self.weight_decay,
                            grad_clip=self.grad_clip, device=self.device, log_every=self.log_every)


# TiKMiX's solver settings live beside their solvers (which import config_fields, not this module).
from automixer_ops.tikmix.solve_d import SolveDSettings  # noqa: E402
from automixer_ops.tikmix.solve_m import SolveMSettings  # noqa: E402


@dataclass(kw_only=True)
class TikmixSection:
    group_by: str = setting("source", "Corpus column whose values are TiKMiX's groups (the mixture draws by "
                                      "source: only 'source' can be mixed yet; any column can be measured).")
    estimate: Literal["sample", "full"] = setting(
        "sample", "Group Influence from a seeded sample of per_group documents per group ('sample', the cheap one "
                  "each stage uses) or from every corpus document ('full').")
    per_group: int = setting(64, "Documents per group in a 'sample' estimate.")
    checkpoint: int | None = setting(None, "Proxy checkpoint step of a static TiKMiX mixture; null: the last.")
    d: SolveDSettings = setting(SolveDSettings(), "TiKMiX-D: the influence-maximising mixture (docs/tikmix.md).")
    m: SolveMSettings = setting(SolveMSettings(), "TiKMiX-M: probe trainings, regressors and search (docs/tikmix.md).")
    stages: int = setting(4, "Stages of a dynamic TiKMiX run: the mixture is re-solved at each stage boundary.")
    stage_tokens: int | None = setting(
        None, "Online mode: the tokens your trainer trains between two re-solves (the caps' denominator); "
              "null: mix.token_budget.")

    def check(self, where: str) -> None:
        if not self.group_by:
            raise ConfigError(f"{where}.group_by: must name a corpus column")
        if self.per_group < 2:
            raise ConfigError(f"{where}.per_group: must be >= 2 (a standard error needs two), got {self.per_group}")
        if self.checkpoint is not None and self.checkpoint < 0:
            raise ConfigError(f"{where}.checkpoint: a step >= 0 or null, got {self.checkpoint}")
        if self.stages < 1:
            raise ConfigError(f"{where}.stages: must be >= 1, got {self.stages}")
        if self.stage_tokens is not None and self.stage_tokens < 1:
            raise ConfigError(f"{where}.stage_tokens: must be >= 1 or null, got {self.stage_tokens}")
        self.d.check(f"{where}.d")


@dataclass(kw_only=True)
class Config:
    run: RunSection = setting(RunSection(), "Where the run lives and its seed.")
    corpus: CorpusSection = required("The raw pretraining corpus.")
    tokenizer: TokenizerSection = setting(TokenizerSection(), "Tokenizer: given, or trained on the corpus.")
    proxy: ProxySection = setting(ProxySection(), "The proxy training run, or your own checkpoints.")
    tasks: TasksSection = setting(TasksSection(), "Target tasks: lm-eval names and custom JSONL tasks.")
    evaluate: EvaluateSection = setting(EvaluateSection(), "Checkpoint evaluation with lm-evaluation-harness.")
    select: SelectSection = setting(SelectSection(), "Choosing each task's best checkpoint (the paper's Table 1).")
    influence: InfluenceSection = setting(InfluenceSection(), "Influence scoring of the corpus (DataInf).")
    regroup: RegroupSection = setting(RegroupSection(), "Regrouping and reweighting in DuckDB SQL (sql/).")
    mix: MixSection = setting(MixSection(), "The token-budgeted training mixture.")
    target: TargetSection = setting(TargetSection(), "The target model `automixer train-target` trains on a mixture "
                                                     "(an experiment file has its own `target`, which experiments use).")
    tikmix: TikmixSection = setting(TikmixSection(), "TiKMiX: Group Influence and mixtures re-solved from it "
                                                     "(`automixer tikmix`, docs/tikmix.md).")

    # Directory that relative paths resolve against; not a YAML key.
    base_dir: Path = field(default=Path("."), repr=False, compare=False, metadata={"internal": True})

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def run_dir(self) -> Path:
        return self.resolve(self.run.root).resolve() / self.run.id

    def to_dict(self, resolved: bool = True) -> dict:
        """The config as plain data; with resolved=True, paths are absolute."""
        data = plain_data(self)
        if resolved:
            data["run"]["root"] = str(self.resolve(self.run.root).resolve())
            data["corpus"]["paths"] = [_resolve_pattern(self, p) for p in self.corpus.paths]
            if self.tokenizer.path:
                data["tokenizer"]["path"] = str(self.resolve(self.tokenizer.path).resolve())
            if self.tasks.data_dir:
                data["tasks"]["data_dir"] = str(self.resolve(self.tasks.data_dir).resolve())
            for item in data["proxy"]["checkpoints"] + data["tasks"]["custom"]:
                item["path"] = str(self.resolve(item["path"]).resolve())
        return data

    def dump_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def _resolve_pattern(cfg: Config, pattern: str) -> str:
    # normpath, not resolve(): a glob pattern is not a path that exists.
    p = Path(pattern).expanduser()
    return os.path.normpath(p if p.is_absolute() else (cfg.base_dir.resolve() / p))


def plain_data(obj: Any) -> Any:
    """A config dataclass (or a list or mapping holding them) as plain dicts and lists, without internal fields."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, (list, tuple)):
        return [plain_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: plain_data(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- loading and validation

def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override (`section.key=value`, value parsed as YAML) and validate a config file."""
    path = Path(path)
    raw = read_yaml_mapping(path, "config file")
    for item in overrides:
        _apply_override(raw, item)
    cfg = config_from_dict(raw, where=str(path))
    cfg.base_dir = path.resolve().parent
    return cfg


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file whose top level is a mapping ({} when empty); unreadable, invalid or another shape is an error
    naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read {what}: {e}") from None
    raw = load_yaml_unique(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def load_yaml_unique(text: str, where: str, prefix: str = "") -> Any:
    """yaml.safe_load, but a mapping that gives a key twice is an error naming the key (its full path, after
    `prefix`) and both lines: PyYAML keeps the last one silently, so a second `proxy:` block would replace the
    first one unnoticed."""
    try:
        _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader), prefix, where)
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:  # the place, without PyYAML's echo of the text
        mark = e.problem_mark or e.context_mark
        place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "; ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: {place}not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {_one_line(str(e))}") from None


def _check_unique_keys(node: Any, prefix: str, where: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
                _check_unique_keys(value, prefix, where)
                continue
            line = key.start_mark.line + 1
            if key.value in seen:
                raise ConfigError(f"{where}: line {line}: duplicate key '{prefix}{key.value}' (first given at line "
                                  f"{seen[key.value]}); give each key once")
            seen[key.value] = line
            _check_unique_keys(value, f"{prefix}{key.value}.", where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{prefix.rstrip('.')}[{i}].", where)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def config_from_dict(raw: dict, where: str = "config") -> Config:
    cfg = _build(Config, raw, prefix="", where=where)
    for f in dataclasses.fields(Config):
        section = getattr(cfg, f.name)
        if hasattr(section, "check"):
            try:
                section.check(f.name)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty `section:` in the YAML
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    node[parts[-1]] = load_yaml_unique(value, f"--set {item!r}: value", prefix=key.strip() + ".")


def _build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    name = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {name}: expected a mapping, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if f"{prefix}{key}" in MOVED and key not in fields:
            raise ConfigError(f"{where}: {prefix}{key}: {MOVED[f'{prefix}{key}']}")
        if key not in fields:
            allowed = ", ".join(fields)
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}; allowed keys here: {allowed}")
    values = {}
    for key, f in fields.items():
        if key in raw:
            values[key] = _coerce(hints[key], raw[key], f"{prefix}{key}", where)
        elif f.metadata.get("required"):
            raise ConfigError(f"{where}: missing required key '{prefix}{key}': {f.metadata['doc']}")
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, prefix=key + ".", where=where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}: {_show(value)} is not allowed; choose one of "
                              + ", ".join(repr(a) for a in args))
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected a list, got {_show(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {_show(value)}")
        return {_coerce(args[0], k, f"{key} (a key)", where): _coerce(args[1], v, f"{key}[{k!r}]", where)
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected an integer, got {_show(value)}")
        if abs(value) > INT64_MAX:
            raise ConfigError(f"{where}: {key}: {value} does not fit in 64 bits")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}: expected a number, got {_show(value)}")
        # NaN passes every `<` check (nan <= 0 is False): no setting means anything with NaN or infinity.
        if not math.isfinite(float(value)):
            raise ConfigError(f"{where}: {key}: must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


# ---------------------------------------------------------------- reference docs

def reference_markdown() -> str:
    """Every setting with its type, default and doc, as Markdown."""
    lines = ["# Configuration reference", "",
             "Generated by `automixer config --reference`. Relative paths resolve against the "
             "config file's directory. Keys marked *required* have no default.", ""]
    hints = typing.get_type_hints(Config)
    for sec in dataclasses.fields(Config):
        if sec.metadata.get("internal"):
            continue
        cls = hints[sec.name]
        lines += [f"## `{sec.name}`", "", sec.metadata["doc"], "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += _reference_rows(cls, "")
        lines.append("")
    return "\n".join(lines)


def _reference_rows(cls: type, prefix: str) -> list[str]:
    """One table row per field; a field that is itself a section (tasks.docs) is followed by its own fields."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = "*required*" if f.metadata.get("required") else f"`{_yaml_scalar(plain_data(_field_default(f)))}`"
        rows.append(f"| `{prefix}{f.name}` | {_type_name(hints[f.name])} | {default} | {f.metadata['doc']} |")
        if dataclasses.is_dataclass(hints[f.name]):
            rows += _reference_rows(hints[f.name], f"{prefix}{f.name}.")
    return rows


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30).strip().removesuffix("...").strip()


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping {_type_name(args[0])} -> {_type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return getattr(tp, "__name__", str(tp))
