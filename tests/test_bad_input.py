"""The bad-input catalogue (issue 15): every step and the DAG Params, tried as a hostile-but-fair user would.

Each case runs the real CLI (`automixer_ops.cli.main`, in-process; a few as subprocesses) and asserts the exit
status (2: bad input; 75: transient, retried by the launcher), one `error:` line that names the file, line,
field or key, no traceback, and no half-written output: every file, directory and link under the case's
directory (the run, the user's files) is byte for byte what it was before. The DAG Params cases assert the
one-line AirflowFailException the task fails with before any command runs.

Fixtures are built once per module: a prepared corpus, the conftest's tiny trained proxy, a scoring run with
one finished fit (copied per case, so a case may damage its copy), a run regrouped from two samplers.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, proxy_config, write_config, write_jsonl

from automixer_ops.cli import main

sys.path.insert(0, str(ROOT / "plugins"))
airflow_sdk = pytest.importorskip("airflow.sdk")
from airflow.sdk.exceptions import AirflowException, AirflowFailException  # noqa: E402

from automixer_launcher.cli_argv import cli_argv, command_failed, config_overrides  # noqa: E402


# ---------------------------------------------------------------- what every case asserts

def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: a file's sha256, a link's target, a directory."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def assert_one_line_error(rc: int, err: str, code: int, needles: list[str]) -> str:
    assert rc == code, f"exit {rc}, expected {code}:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), f"not one error line at the end:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@dataclass
class Case:
    """One bad input: `setup(ctx)` builds it under ctx.tmp and returns the CLI arguments."""

    id: str
    setup: Callable[["Ctx"], list[str]]
    needles: list[str]
    code: int = 2
    fixtures: tuple[str, ...] = ()
    watch: Callable[["Ctx"], Path] | None = None  # what must not change; default: ctx.tmp
    hold: Callable[["Ctx"], object] | None = None  # an flock another process would hold, as (path, mode)
    after: Callable[["Ctx"], None] | None = None  # more checks once the command has failed


@dataclass
class Ctx:
    tmp: Path
    fx: dict = field(default_factory=dict)  # the module fixtures the case asked for, by name


CASES: list[Case] = []


def case(id: str, needles: list[str], code: int = 2, fixtures: tuple[str, ...] = (), **kw):
    def register(setup):
        CASES.append(Case(id, setup, needles, code, fixtures, **kw))
        return setup
    return register


# ---------------------------------------------------------------- config (automixer config -c)

BASE = "corpus: {paths: [c.jsonl]}\n"


def config_case(id: str, text: str | bytes, needles: list[str], sets: tuple[str, ...] = ()):
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.tmp / "cfg.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["config", "-c", str(path), *(a for s in sets for a in ("--set", s))]
    CASES.append(Case(f"config-{id}", setup, needles))


config_case("duplicate-section", BASE + "proxy: {lr: 0.1}\nproxy: {max_steps: 5}\n",
            ["cfg.yaml: line 3: duplicate key 'proxy'", "first given at line 2"])
config_case("duplicate-nested-key", "corpus:\n  paths: [c.jsonl]\nproxy:\n  lr: 0.1\n  lr: 0.2\n",
            ["line 5: duplicate key 'proxy.lr'", "first given at line 4"])
config_case("duplicate-key-in-list-item", BASE + "proxy:\n  checkpoints:\n    - {step: 1, path: a, step: 2}\n",
            ["line 4: duplicate key 'proxy.checkpoints[0].step'"])
config_case("duplicate-key-in-set", BASE, ["--set 'proxy={lr: 1, lr: 2}'", "duplicate key 'proxy.lr'"],
            sets=("proxy={lr: 1, lr: 2}",))
config_case("lr-nan", BASE + "proxy: {lr: .nan}\n", ["proxy.lr: must be a finite number, got nan"])
config_case("lr-inf", BASE + "proxy: {lr: .inf}\n", ["proxy.lr: must be a finite number, got inf"])
config_case("lr-nan-set", BASE, ["proxy.lr: must be a finite number"], sets=("proxy.lr=.nan",))
config_case("lr-zero", BASE + "proxy: {lr: 0}\n", ["proxy.lr: must be > 0"])
config_case("keep-fraction-nan", BASE + "regroup: {keep_fraction: .nan}\n", ["regroup.keep_fraction: must be a finite"])
config_case("keep-fraction-zero", BASE + "regroup: {keep_fraction: 0}\n", ["regroup.keep_fraction: must be in (0, 1]"])
config_case("seed-2-70", BASE + f"run: {{seed: {2**70}}}\n", ["run.seed", "64 bits"])
config_case("seed-2-40", BASE + f"run: {{seed: {2**40}}}\n", ["run.seed: must be in [0, 4294967295]"])
config_case("seed-2-70-set", BASE, ["run.seed"], sets=(f"run.seed={2**70}",))
config_case("seed-negative", BASE + "run: {seed: -1}\n", ["run.seed: must be in [0, 4294967295]"])
config_case("grad-clip-negative", BASE + "proxy: {grad_clip: -1}\n", ["proxy.grad_clip: must be >= 0, got -1"])
config_case("weight-decay-negative", BASE + "proxy: {weight_decay: -0.1}\n", ["proxy.weight_decay: must be >= 0"])
config_case("min-lr-ratio-above-1", BASE + "proxy: {min_lr_ratio: 2}\n", ["proxy.min_lr_ratio: must be in [0, 1]"])
config_case("token-budget-2-70", BASE + f"mix: {{token_budget: {2**70}}}\n", ["mix.token_budget", "64 bits"])
config_case("caps-negative", BASE + "mix: {caps: [{group: step-1, max_tokens: -1}]}\n", ["mix.caps"])
config_case("evaluate-limit-moved", BASE + "evaluate: {limit: 100}\n",
            ["cfg.yaml: evaluate.limit: moved to tasks.docs.selection (documents [0, limit))"])
config_case("evaluate-limit-moved-set", BASE, ["evaluate.limit: moved to tasks.docs.selection"],
            sets=("evaluate.limit=5",))
config_case("val-docs-per-task-moved", BASE + "influence: {val_docs_per_task: 32}\n",
            ["influence.val_docs_per_task: moved to tasks.docs.validation"])
config_case("task-docs-overlap", BASE + "tasks: {docs: {selection: [0, 100], validation: [50, 82]}}\n",
            ["tasks.docs.selection [0, 100) and tasks.docs.validation [50, 82) overlap: a document used to choose "
             "or to score must not be a test document"])
config_case("task-docs-test-overlap", BASE + "tasks: {docs: {test: [150, 300]}}\n",
            ["tasks.docs.validation [100, 164) and tasks.docs.test [150, 300) overlap"])
config_case("task-docs-empty-range", BASE + "tasks: {docs: {test: [300, 300]}}\n",
            ["tasks.docs.test: expected [start, end] with 0 <= start < end, got [300, 300]"])
config_case("task-docs-not-a-pair", BASE + "tasks: {docs: {selection: [0, 10, 20]}}\n",
            ["tasks.docs.selection: expected [start, end]"])
config_case("select-metric-choice", BASE + "select: {metric: f1}\n", ["select.metric: str 'f1' is not allowed"])
config_case("select-noise-z-negative", BASE + "select: {noise_z: -1}\n", ["select.noise_z: must be >= 0"])
config_case("unknown-key", BASE + "proxy: {lrr: 0.1}\n", ["unknown key 'proxy.lrr'", "did you mean 'lr'"])
config_case("wrong-type", BASE + "proxy: {max_steps: ten}\n", ["proxy.max_steps: expected an integer"])
config_case("not-yaml", "corpus: {paths: [c.jsonl]\n",
            ["cfg.yaml: line 2, column 1: not valid YAML", "expected ',' or '}'"])
config_case("tab-indent", "corpus:\n\tpaths: [c.jsonl]\n", ["cfg.yaml: line 2, column 1: not valid YAML", "'\\t'"])
config_case("two-documents", BASE + "---\nrun: {id: x}\n", ["cfg.yaml: line 2, column 1: not valid YAML",
                                                          "expected a single document"])
config_case("top-level-list", "- a\n- b\n", ["the top level must be a mapping"])
config_case("no-corpus", "run: {id: x}\n", ["missing required key 'corpus'"])
config_case("run-id-escapes", BASE + "run: {id: ../x}\n", ["run.id: '../x' is not a valid run id"])
config_case("warmup-not-below-max-steps", BASE + "proxy: {max_steps: 5, warmup_steps: 5}\n", ["proxy.warmup_steps"])
config_case("checkpoint-steps-repeat",
            BASE + "proxy: {checkpoints: [{step: 1, path: a}, {step: 1, path: b}]}\n",
            ["proxy.checkpoints: steps must be distinct"])
config_case("custom-task-name", BASE + "tasks: {custom: [{name: 1x, path: t.jsonl}]}\n",
            ["tasks.custom: '1x' is not a valid task name"])
config_case("device-choice", BASE + "proxy: {device: tpu}\n", ["proxy.device: str 'tpu' is not allowed"])
config_case("set-without-equals", BASE, ["--set 'proxy.lr'", "section.key=value"], sets=("proxy.lr",))
config_case("set-not-yaml", BASE, ["--set 'proxy.lr=[1'", "not valid YAML"], sets=("proxy.lr=[1",))
config_case("not-utf8", b"corpus: {paths: [\xff.jsonl]}\n", ["cfg.yaml: cannot read config"])


@case("config-file-missing", ["missing.yaml: config file not found"])
def _(ctx):
    return ["config", "-c", str(ctx.tmp / "missing.yaml")]


# ---------------------------------------------------------------- corpus (automixer prepare)

GOOD = [{"id": "a", "text": "The first document has some words."}, {"id": "b", "text": "A second one, also short."}]


def corpus_case(id: str, needles: list[str], rows: list | None = None, corpus: dict | None = None,
                name: str = "c.jsonl", write: Callable[[Path], None] | None = None, tokenizer: dict | None = None,
                extra: tuple[str, ...] = ()):
    """prepare on c.jsonl holding GOOD's first row then `rows` (or what `write` makes)."""
    def setup(ctx: Ctx) -> list[str]:
        path = ctx.tmp / name
        if write is not None:
            write(path)
        elif rows is not None:
            write_jsonl(path, [GOOD[0], *rows])
        config = write_config(ctx.tmp / "cfg.yaml", {"paths": [name], **(corpus or {})}, tokenizer=tokenizer)
        return ["prepare", "-c", str(config), *extra]
    CASES.append(Case(f"corpus-{id}", setup, needles))


def parquet_writer(table: dict) -> Callable[[Path], None]:
    return lambda path: pq.write_table(pa.table(table), path)


def bytes_writer(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def truncated_gzip(path: Path) -> None:
    data = gzip.compress("".join(json.dumps({"id": str(i), "text": f"document {i} " * 20}) + "\n"
                                 for i in range(500)).encode())
    path.write_bytes(data[: len(data) // 2])


corpus_case("null-id", ["c.jsonl:2: id field 'id' is null"], [{"id": None, "text": "x y"}])
corpus_case("null-text", ["c.jsonl:2: text field 'text' is null"], [{"id": "b", "text": None}])
corpus_case("null-id-parquet", ["c.parquet: row 2: id field 'id' is null"], name="c.parquet",
            write=parquet_writer({"id": ["a", None], "text": ["x y", "z w"]}))
corpus_case("null-text-parquet", ["c.parquet: row 1: text field 'text' is null"], name="c.parquet",
            write=parquet_writer({"id": ["a", "b"], "text": [None, "z w"]}))
corpus_case("missing-id", ["c.jsonl:2: missing id field 'id'", "'text'"], [{"text": "x y"}])
corpus_case("missing-text", ["c.jsonl:2: missing text field 'text'"], [{"id": "b", "body": "x"}])
corpus_case("missing-custom-id-field", ["c.jsonl:1: missing id field 'doc_id'"], [], corpus={"id_field": "doc_id"})
corpus_case("id-list", ["c.jsonl:2: id field 'id' must be a string or integer, got list"], [{"id": [1], "text": "x"}])
corpus_case("id-bool", ["c.jsonl:2: id field 'id' must be a string or integer, got bool"], [{"id": True, "text": "x"}])
corpus_case("id-blank", ["c.jsonl:2: id field 'id' is empty"], [{"id": "  ", "text": "x y"}])
corpus_case("text-number", ["c.jsonl:2: text field 'text' must be a string, got int"], [{"id": "b", "text": 5}])
corpus_case("source-number", ["c.jsonl:2: source field 'source' must be a string"], [{"id": "b", "text": "x", "source": 1}])
corpus_case("line-not-object", ["c.jsonl:2: expected a JSON object, got list"], ["[1, 2]"])
corpus_case("line-not-json", ["c.jsonl:2: not valid JSON"], ['{"id": "b", "text": '])
corpus_case("not-utf8", ["c.jsonl:1: not valid UTF-8 (byte 0xff"], write=bytes_writer(b'{"id": "a", "text": "\xff"}\n'))
corpus_case("truncated-gzip", ["c.jsonl.gz: cannot read past record"], name="c.jsonl.gz", write=truncated_gzip)
corpus_case("corrupt-parquet", ["c.parquet: not a readable Parquet file"], name="c.parquet",
            write=bytes_writer(b"PAR1 this is not parquet PAR1"))
corpus_case("parquet-without-text", ["c.parquet: missing text field 'text'", "columns: id, body"], name="c.parquet",
            write=parquet_writer({"id": ["a"], "body": ["x"]}))
corpus_case("duplicate-ids", ["duplicate document ids", "id 'a' at", "c.jsonl:1", "c.jsonl:2"],
            [{"id": "a", "text": "again"}])
corpus_case("empty-file", ["c.jsonl: empty input, no documents"], write=bytes_writer(b""))
corpus_case("only-empty-texts", ["no documents with text", "2 empty texts skipped"],
            write=lambda p: write_jsonl(p, [{"id": "a", "text": " "}, {"id": "b", "text": ""}]))
corpus_case("empty-text-is-error", ["c.jsonl:2: text field 'text' is empty"], [{"id": "b", "text": "  "}],
            corpus={"empty_text": "error"})
corpus_case("matches-nothing", ["corpus.paths: 'none-*.jsonl' matches no file"], [], corpus={"paths": ["none-*.jsonl"]})
corpus_case("unknown-extension", ["c.txt: cannot tell the format"], name="c.txt",
            write=lambda p: p.write_text(json.dumps(GOOD[0]) + "\n"))


@case("corpus-config-directory-brackets-are-not-a-glob", ["corpus.paths: 'part-*.jsonl' matches no file", "exp[1]"])
def _(ctx):
    # Before the fix the config's directory 'exp[1]' was part of the pattern, a class matching exp1/: the files of
    # another directory were prepared, exit 0. Now only the configured part is a pattern.
    write_jsonl(ctx.tmp / "exp1" / "part-a.jsonl", GOOD)
    (ctx.tmp / "exp[1]").mkdir()
    return ["prepare", "-c", str(write_config(ctx.tmp / "exp[1]" / "cfg.yaml", {"paths": ["part-*.jsonl"]}))]


@case("corpus-directory-without-data", ["directory", "holds no JSONL or Parquet file"])
def _(ctx):
    (ctx.tmp / "docs").mkdir()
    (ctx.tmp / "docs" / "notes.txt").write_text("x")
    return ["prepare", "-c", str(write_config(ctx.tmp / "cfg.yaml", {"paths": ["docs"]}))]


# ---------------------------------------------------------------- tokenizer (automixer prepare)

corpus_case("tokenizer-path-missing", ["tokenizer.path:", "is not a directory"], GOOD[1:],
            tokenizer={"path": "no-such-dir"})
corpus_case("tokenizer-vocab-too-small", ["tokenizer.vocab_size: must be >= 260"], GOOD[1:],
            tokenizer={"vocab_size": 100})


@case("tokenizer-dir-empty", ["tokenizer.path: cannot load a tokenizer from", "tok"])
def _(ctx):
    write_jsonl(ctx.tmp / "c.jsonl", GOOD)
    (ctx.tmp / "tok").mkdir()
    return ["prepare", "-c", str(write_config(ctx.tmp / "cfg.yaml", {"paths": ["c.jsonl"]}, tokenizer={"path": "tok"}))]


@case("tokenizer-json-damaged", ["tokenizer.path: cannot load a tokenizer from"], fixtures=("trained",))
def _(ctx):
    _, run_dir = ctx.fx["trained"]
    write_jsonl(ctx.tmp / "c.jsonl", GOOD)
    shutil.copytree(run_dir / "tokenizer", ctx.tmp / "tok")
    (ctx.tmp / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return ["prepare", "-c", str(write_config(ctx.tmp / "cfg.yaml", {"paths": ["c.jsonl"]}, tokenizer={"path": "tok"}))]


# ---------------------------------------------------------------- paths: the user's directories

def _user_dir(ctx: Ctx) -> Path:
    """A directory of the user's that a run id points at."""
    mine = ctx.tmp / "runs" / "t"
    (mine / "tokenizer").mkdir(parents=True)
    (mine / "config.yaml").write_text("my own config\n")
    (mine / "tokenizer" / "vocab.txt").write_text("mine\n")
    write_jsonl(ctx.tmp / "c.jsonl", GOOD)
    return mine


@case("paths-prepare-into-users-directory", ["runs/t: exists and is not an AutoMixer run directory",
                                             "_AUTOMIXER_RUN.json", "config.yaml"])
def _(ctx):
    _user_dir(ctx)  # before the fix: its config.yaml and tokenizer/ were replaced, exit 0
    return ["prepare", "-c", str(write_config(ctx.tmp / "cfg.yaml", {"paths": ["c.jsonl"]}))]


@case("paths-prepare-force-into-users-directory", ["is not an AutoMixer run directory"])
def _(ctx):
    _user_dir(ctx)
    return ["prepare", "-c", str(write_config(ctx.tmp / "cfg.yaml", {"paths": ["c.jsonl"]})), "--force"]


@case("paths-run-directory-is-a-file", ["runs/t: the run directory (run.root/run.id) exists and is not a directory"])
def _(ctx):
    write_jsonl(ctx.tmp / "c.jsonl", GOOD)
    (ctx.tmp / "runs").mkdir()
    (ctx.tmp / "runs" / "t").write_text("a file\n")  # before the fix: NotADirectoryError, a traceback
    return ["prepare", "-c", str(write_config(ctx.tmp / "cfg.yaml", {"paths": ["c.jsonl"]}))]


@case("paths-corpus-marker-damaged", ["corpus/_SUCCESS.json: unreadable completion marker"], fixtures=("prepared",))
def _(ctx):
    config = copy_run(ctx, ctx.fx["prepared"])
    (ctx.tmp / "runs" / "p" / "corpus" / "_SUCCESS.json").write_text('{"fingerprint": ')  # before: a traceback
    return ["prepare", "-c", str(config)]


@case("paths-train-before-prepare", ["corpus: no prepared corpus; run `automixer prepare` first"])
def _(ctx):
    return ["train-proxy", "-c", str(write_config(ctx.tmp / "cfg.yaml", {"paths": ["c.jsonl"]}))]


# ---------------------------------------------------------------- checkpoints (train-proxy, bring your own)

def copy_run(ctx: Ctx, source: tuple[Path, Path], drop: tuple[str, ...] = ()) -> Path:
    """Copy a run (config file, run directory) under ctx.tmp; the config's run.root points at the copy."""
    config, run_dir = source
    raw = yaml.safe_load(Path(config).read_text())
    raw["run"]["root"] = str(ctx.tmp / "runs")
    shutil.copytree(run_dir, ctx.tmp / "runs" / run_dir.name, symlinks=True,
                    ignore=shutil.ignore_patterns(*drop) if drop else None)
    out = ctx.tmp / "cfg.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def byo_config(ctx: Ctx, src: Path, step: int = 5) -> Path:
    """The prepared run (the trained proxy's tokenizer), linking `src` as the user's checkpoint."""
    config = copy_run(ctx, ctx.fx["prepared"])
    raw = yaml.safe_load(config.read_text())
    raw["proxy"] = {"checkpoints": [{"step": step, "path": str(src)}]}
    config.write_text(yaml.safe_dump(raw))
    return config


def user_checkpoint(ctx: Ctx, damage: Callable[[Path], None] | None = None) -> Path:
    _, trained_dir = ctx.fx["trained"]
    src = ctx.tmp / "mine"
    shutil.copytree(trained_dir / "checkpoints" / "step-10", src)
    if damage:
        damage(src)
    return src


def byo_case(id: str, needles: list[str], damage: Callable[[Path], None]):
    def setup(ctx: Ctx) -> list[str]:
        return ["train-proxy", "-c", str(byo_config(ctx, user_checkpoint(ctx, damage)))]
    CASES.append(Case(f"checkpoint-{id}", setup, ["proxy.checkpoints (step 5):", *needles],
                      fixtures=("trained", "prepared")))


def edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def as_truncated_bin(src: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    truncate(src / "pytorch_model.bin")


def with_missing_shard(src: Path) -> None:
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))


byo_case("not-a-checkpoint", ["not a Hugging Face checkpoint directory (no config.json)"],
         lambda src: (src / "config.json").unlink())
byo_case("no-weights", ["holds no model weights"], lambda src: (src / "model.safetensors").unlink())
byo_case("config-not-json", ["config.json is not valid JSON"], lambda src: (src / "config.json").write_text("{"))
byo_case("needs-trust-remote-code", ["auto_map", "trust_remote_code"],
         lambda src: edit_config(src, auto_map={"AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}))
byo_case("unknown-architecture", ["model_type 'mine-arch' is not an architecture transformers ships"],
         lambda src: edit_config(src, model_type="mine-arch"))
byo_case("not-a-causal-lm", ["model_type 'vit' is not a causal language model"],
         lambda src: edit_config(src, model_type="vit"))
byo_case("truncated-safetensors", ["model.safetensors is truncated or damaged", "its header describes"],
         lambda src: truncate(src / "model.safetensors"))
byo_case("garbage-safetensors", ["model.safetensors is not a readable safetensors file"],
         lambda src: (src / "model.safetensors").write_bytes(b"\xff" * 16))
byo_case("truncated-pytorch-bin", ["pytorch_model.bin is truncated or not a PyTorch weights file"], as_truncated_bin)
byo_case("index-lists-missing-shard", ["model.safetensors.index.json lists weight file(s) that are missing",
                                       "model-00002-of-00002.safetensors"], with_missing_shard)
byo_case("vocabulary-too-small", ["model vocabulary (10) is smaller than the run's tokenizer"],
         lambda src: edit_config(src, vocab_size=10))
byo_case("tokenizer-damaged", ["cannot load its tokenizer"],
         lambda src: (src / "tokenizer.json").write_text("{"))


@case("checkpoint-path-missing", ["proxy.checkpoints (step 5):", "no config.json"], fixtures=("trained", "prepared"))
def _(ctx):
    return ["train-proxy", "-c", str(byo_config(ctx, ctx.tmp / "nowhere"))]


def _switch_to_training(ctx: Ctx) -> list[str]:
    """The user's checkpoint (with a trainer_state.pt) linked into a run, then proxy.checkpoints emptied."""
    _, trained_dir = ctx.fx["trained"]
    config = copy_run(ctx, ctx.fx["trained"], drop=("checkpoints",))
    src = user_checkpoint(ctx)
    shutil.copy(trained_dir / "checkpoints" / "step-30" / "trainer_state.pt", src / "trainer_state.pt")
    raw = yaml.safe_load(config.read_text())
    linking = ctx.tmp / "linking.yaml"
    linking.write_text(yaml.safe_dump({**raw, "proxy": {**raw["proxy"], "checkpoints": [{"step": 10, "path": str(src)}]}}))
    assert main(["train-proxy", "-c", str(linking)]) == 0
    assert (ctx.tmp / "runs" / "a" / "checkpoints" / "step-10").is_symlink()
    # Before the fix: training resumed from the user's trainer_state.pt (weights_only=False), then deleted it.
    return ["train-proxy", "-c", str(config)]


CASES.append(Case("checkpoint-switch-linked-run-to-training", _switch_to_training,
                  ["proxy.checkpoints: empty", "links your own checkpoints", "step-10 ->", "mine"],
                  fixtures=("trained",),
                  after=lambda ctx: (ctx.tmp / "mine" / "trainer_state.pt").is_file() or pytest.fail("deleted")))


@case("checkpoint-switch-trained-run-to-linked", ["proxy.checkpoints: given", "holds checkpoints this run trained",
                                                  "step-10"], fixtures=("trained",))
def _(ctx):
    _, trained_dir = ctx.fx["trained"]
    config = copy_run(ctx, ctx.fx["trained"])
    raw = yaml.safe_load(config.read_text())
    raw["proxy"]["checkpoints"] = [{"step": 1000, "path": str(trained_dir / "checkpoints" / "step-10")}]
    config.write_text(yaml.safe_dump(raw))  # before the fix: linked beside the trained ones, exit 0
    return ["train-proxy", "-c", str(config)]


class _Touch:
    """A pickle that creates a file when unpickled with weights_only=False."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@case("checkpoint-trainer-state-runs-code", ["step-20/trainer_state.pt", "weights_only"], fixtures=("trained",),
      after=lambda ctx: not (ctx.tmp / "PWNED").exists() or pytest.fail("the pickle ran"))
def _(ctx):
    import torch

    config = copy_run(ctx, ctx.fx["trained"])
    ckpts = ctx.tmp / "runs" / "a" / "checkpoints"
    shutil.rmtree(ckpts / "step-30")
    torch.save({"optimizer": _Touch(ctx.tmp / "PWNED")}, ckpts / "step-20" / "trainer_state.pt")
    return ["train-proxy", "-c", str(config)]


@case("checkpoint-marker-damaged", ["step-30/_SUCCESS.json: unreadable completion marker"], fixtures=("trained",))
def _(ctx):
    config = copy_run(ctx, ctx.fx["trained"])
    (ctx.tmp / "runs" / "a" / "checkpoints" / "step-30" / "_SUCCESS.json").write_text("{")
    return ["train-proxy", "-c", str(config)]


# ---------------------------------------------------------------- custom tasks (automixer evaluate)

def eval_run_dir(ctx: Ctx) -> Path:
    """The shared run evaluate's cases point at (its config file and run directory)."""
    return ctx.fx["eval_run"].parent


def task_case(id: str, lines: list[str] | None, needles: list[str], tasks: dict | None = None):
    def setup(ctx: Ctx) -> list[str]:
        config = ctx.fx["eval_run"]
        if lines is not None:
            (ctx.tmp / "t.jsonl").write_text("".join(line + "\n" for line in lines))
        raw = yaml.safe_load(config.read_text())
        raw["tasks"] = tasks or {"targets": [], "custom": [{"name": "mine", "path": str(ctx.tmp / "t.jsonl")}]}
        case_config = ctx.tmp / "cfg.yaml"
        case_config.write_text(yaml.safe_dump(raw))
        return ["evaluate", "-c", str(case_config)]
    CASES.append(Case(f"task-{id}", setup, needles, fixtures=("eval_run",), watch=eval_run_dir))


LL = '{"context": "a", "continuation": " b"}'
MC = '{"context": "a", "choices": ["x", "y"], "gold": 0}'
task_case("blank-line", [LL, "", LL], ["t.jsonl:2: blank line"])
task_case("not-json", [LL, "{"], ["t.jsonl:2: not valid UTF-8 JSON"])
task_case("no-context", ['{"continuation": " b"}'], ["t.jsonl:1: each line needs a string field 'context'"])
task_case("neither-kind", ['{"context": "a"}'], ["t.jsonl:1: needs 'choices' and 'gold'"])
task_case("mixed-kinds", [LL, MC], ["t.jsonl:2: mixes multiple-choice and likelihood-only lines"])
task_case("one-choice", ['{"context": "a", "choices": ["x"], "gold": 0}'], ["t.jsonl:1: 'choices' must be a list"])
task_case("gold-out-of-range", ['{"context": "a", "choices": ["x", "y"], "gold": 2}'], ["t.jsonl:1: 'gold' must be"])
task_case("gold-bool", ['{"context": "a", "choices": ["x", "y"], "gold": true}'], ["t.jsonl:1: 'gold' must be"])
task_case("empty-continuation", ['{"context": "a", "continuation": ""}'], ["t.jsonl:1: 'continuation' must be"])
task_case("empty-file", [], ["tasks.custom (mine):", "t.jsonl is empty"])
task_case("file-missing", None, ["tasks.custom (mine):", "t.jsonl not found"])
task_case("continuation-longer-than-context", [LL, json.dumps({"context": "a", "continuation": " word" * 400})],
          ["t.jsonl:2: a continuation of", "does not fit the context of checkpoint step 10 (256 tokens)"])
task_case("no-local-copy", None, ["tasks.data_dir: no local copy of 'piqa'"],
          tasks={"targets": ["piqa"], "data_dir": "/nonexistent"})
# 3 documents: selection [0, 100) is clipped to [0, 3), validation [100, 164) leaves none (nothing written: the
# tasks are loaded and their ranges checked before the run's eval/tasks YAMLs are).
task_case("docs-range-past-the-task", [LL, LL, LL],
          ["tasks.docs.validation: [100, 164) leaves task 'mine' with no documents (it has 3"])


@case("evaluate-step-not-a-checkpoint", ["no checkpoint at step 7"], fixtures=("eval_run",), watch=eval_run_dir)
def _(ctx):
    return ["evaluate", "-c", str(ctx.fx["eval_run"]), "--step", "7"]


# ---------------------------------------------------------------- intermediates (score, select, regroup, mix, report)

def fitted_case(id: str, args: list[str], needles: list[str], damage: Callable[[Path], None] | None = None,
                code: int = 2, hold: Callable[[Path], tuple[Path, int]] | None = None, fixture: str = "fitted"):
    """A copy of the fitted scoring run (sampler steps 10 and 30; step 10 fitted), damaged by `damage(run_dir)`."""
    def setup(ctx: Ctx) -> list[str]:
        config = copy_run(ctx, ctx.fx[fixture])
        if damage:
            damage(ctx.tmp / "runs" / ctx.fx[fixture][1].name)
        return [args[0], "-c", str(config), *args[1:]]
    held = (lambda ctx: hold(ctx.tmp / "runs" / ctx.fx[fixture][1].name)) if hold else None
    CASES.append(Case(f"{args[0]}-{id}", setup, needles, code, (fixture,), hold=held))


SHARD = ["score", "--step", "10", "--shards", "0:1"]
FIT10 = "scores/step=10"


def damage_json(rel: str, text: str | Callable[[dict], dict]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / rel
        path.write_text(text if isinstance(text, str) else json.dumps(text(json.loads(path.read_text()))))
    return damage


def rewrite_fit_tensors(change: Callable[[dict, dict], tuple[dict, dict]]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = run / FIT10 / "fit.safetensors"
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors, meta = change(tensors, meta)
        save_file(tensors, str(path), metadata=meta)
    return damage


def lock(run: Path, mode: int) -> tuple[Path, int]:
    return run / FIT10 / ".fit.lock", mode


fitted_case("fit-json-truncated", SHARD, ["scores/step=10/fit.json: damaged", "--fit-only --force"],
            damage_json(f"{FIT10}/fit.json", '{"fingerprint": "ab'))
fitted_case("fit-json-not-an-object", SHARD, ["fit.json: expected a JSON object"], damage_json(f"{FIT10}/fit.json", "[]"))
fitted_case("fit-json-without-layers", SHARD, ["fit.json: field 'layers' is missing"],
            damage_json(f"{FIT10}/fit.json", lambda d: {k: v for k, v in d.items() if k != "layers"}))
fitted_case("fit-json-damaged-refit", ["score", "--step", "10", "--fit-only"], ["fit.json: damaged", "--force"],
            damage_json(f"{FIT10}/fit.json", "{"))
fitted_case("fit-safetensors-truncated", SHARD, ["scores/step=10/fit.safetensors: damaged", "--fit-only --force"],
            lambda run: truncate(run / FIT10 / "fit.safetensors"))
fitted_case("fit-safetensors-missing-tensor", SHARD, ["fit.safetensors: no tensor r.embed"],
            rewrite_fit_tensors(lambda t, m: ({k: v for k, v in t.items() if k != "r.embed"}, m)))
fitted_case("fit-files-from-two-fits", SHARD, ["fit.json and fit.safetensors are not both from the fit",
                                               "a refit was stopped", "--fit-only"],
            rewrite_fit_tensors(lambda t, m: (t, {**m, "fingerprint": "another-fit"})))
fitted_case("fit-running", SHARD, ["error (transient, retry later)", "a fit of sampler step 10 is running"],
            code=75, hold=lambda run: lock(run, fcntl.LOCK_EX))
fitted_case("refit-while-shards-score", ["score", "--step", "10", "--fit-only", "--force"],
            ["a fit or the scoring of sampler step 10 is running"], code=75, hold=lambda run: lock(run, fcntl.LOCK_SH))
fitted_case("fit-resume-state-damaged", ["score", "--step", "10", "--fit-only"],
            [".fit/pass1.pt: cannot resume the fit", "--force"],
            lambda run: ((run / FIT10 / "fit.json").unlink(), (run / FIT10 / ".fit" / "pass1.pt").write_bytes(b"garbage")))
fitted_case("shards-reversed", ["score", "--step", "10", "--shards", "3:1"],
            ["--shards '3:1': END (1) must be greater than START (3)"])
fitted_case("shards-not-numbers", ["score", "--step", "10", "--shards", "a:b"], ["--shards 'a:b': expected START:END"])
fitted_case("shards-past-the-corpus", ["score", "--step", "10", "--shards", "9:"],
            ["--shards '9:': START must be a shard of the corpus, 0..3"])
fitted_case("shards-without-step", ["score", "--shards", "0:1"], ["--shards needs --step"])
fitted_case("step-not-a-sampler", ["score", "--step", "7", "--fit-only"], ["--step 7: not a sampler of this run"])
fitted_case("selection-truncated", SHARD, ["selection.json: not valid JSON"], damage_json("selection.json", '{"tasks": {'))
fitted_case("selection-alpha-sum", SHARD, ["selection.json: samplers: alpha must sum to 1"],
            damage_json("selection.json", lambda d: {**d, "samplers": [{**s, "alpha": 0.9} for s in d["samplers"]]}))
fitted_case("selection-missing", SHARD, ["selection.json: not found; run `automixer select` first"],
            lambda run: (run / "selection.json").unlink())
fitted_case("valset-missing", ["score", "--step", "10", "--fit-only"], ["valsets/piqa.jsonl: no validation set"],
            lambda run: (run / "valsets" / "piqa.jsonl").unlink())
fitted_case("valset-line-not-json", ["score", "--step", "10", "--fit-only"], ["valsets/piqa.jsonl:2: not valid JSON"],
            lambda run: (run / "valsets" / "piqa.jsonl").write_text('{"context": "Q", "continuation": " A"}\n{\n'))
fitted_case("corpus-shard-damaged", ["score", "--step", "10", "--shards", "1:2"],
            ["corpus/part-00001.parquet: not a readable corpus shard", "prepare --force"],
            lambda run: truncate(run / "corpus" / "part-00001.parquet"))
fitted_case("corpus-marker-damaged", SHARD, ["corpus/_SUCCESS.json: unreadable completion marker"],
            lambda run: (run / "corpus" / "_SUCCESS.json").write_text("{"))
fitted_case("before-evaluate", ["select"], ["eval/benchmark.parquet: not found; run `automixer evaluate` first"])
fitted_case("before-regroup", ["mix"], ["automixer.duckdb: not found; run `automixer regroup` first"])
fitted_case("before-scoring", ["regroup"], ["no score shards for sampler step"])
fitted_case("before-mix", ["report"], ["no mixture drawn since the last `automixer regroup`"],
            fixture="regrouped")


def _string_utilities(run: Path) -> None:
    path = run / "scores" / "step=30" / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(1, "utility", pa.array([str(u) for u in table.column("utility").to_pylist()])),
                   path)


fitted_case("score-parquet-damaged", ["regroup"], ["step=30/part-00000.parquet: not a readable Parquet file"],
            lambda run: truncate(run / "scores" / "step=30" / "part-00000.parquet"), fixture="regrouped")
fitted_case("utility-strings", ["regroup"], ["step=30/part-00000.parquet: column 'utility'"],
            _string_utilities, fixture="regrouped")


# ---------------------------------------------------------------- module fixtures

@pytest.fixture(scope="module")
def prepared(trained, small_corpus, tmp_path_factory):
    """The small corpus prepared with the trained proxy's tokenizer (run 'p'), no checkpoints: (config, run dir)."""
    from automixer_ops.config import load_config
    from automixer_ops.prepare import prepare

    _, trained_dir = trained
    tmp = tmp_path_factory.mktemp("bad_prepared")
    config = proxy_config(tmp, small_corpus, "p")
    raw = yaml.safe_load(config.read_text())
    raw["tokenizer"]["path"] = str(trained_dir / "tokenizer")
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    prepare(cfg, log=lambda _: None)
    return config, cfg.run_dir


@pytest.fixture(scope="module")
def eval_run(trained, tmp_path_factory):
    """A copy of the trained run, as evaluate's cases read it (they must leave it as it is)."""
    ctx = Ctx(tmp_path_factory.mktemp("bad_eval") / "base")
    ctx.tmp.mkdir()
    return copy_run(ctx, trained)


@pytest.fixture(scope="module")
def fitted(scoring_run, tmp_path_factory):
    """A copy of conftest's scoring run (4 shards; samplers 10 and 30) with the fit of sampler 10 done."""
    from automixer_ops.config import load_config

    ctx = Ctx(tmp_path_factory.mktemp("bad_fitted"))
    config = copy_run(ctx, (scoring_run, load_config(scoring_run).run_dir))
    assert main(["score", "-c", str(config), "--step", "10", "--fit-only"]) == 0
    return config, load_config(config).run_dir


@pytest.fixture(scope="module")
def regrouped(fitted, tmp_path_factory):
    """The fitted run, every sampler scored and regrouped (no mixture yet)."""
    from automixer_ops.config import load_config

    ctx = Ctx(tmp_path_factory.mktemp("bad_regrouped"))
    config = copy_run(ctx, fitted)
    assert main(["score", "-c", str(config)]) == 0
    assert main(["regroup", "-c", str(config)]) == 0
    return config, load_config(config).run_dir


# ---------------------------------------------------------------- the catalogue

@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_with_exit_status_and_no_output(c: Case, tmp_path, request, capsys):
    ctx = Ctx(tmp_path / "case")
    ctx.tmp.mkdir()
    ctx.fx = {name: request.getfixturevalue(name) for name in c.fixtures}
    argv = c.setup(ctx)
    capsys.readouterr()
    watched = c.watch(ctx) if c.watch else ctx.tmp
    before = snapshot(watched)
    held = None
    if c.hold is not None:  # another process's lock: a separate open file, so flock conflicts in this process too
        path, mode = c.hold(ctx)
        held = open(path, "a+b")
        fcntl.flock(held.fileno(), mode)
    try:
        rc = main(argv)
    finally:
        if held is not None:
            held.close()
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, c.code, c.needles)
    assert snapshot(watched) == before, "the failed step changed files"
    if c.after is not None:
        c.after(ctx)


def test_the_catalogue_covers_every_step_with_80_cases():
    assert len(CASES) + len(PARAM_CASES) + len(PARAM_CLI_CASES) >= 80
    kinds = {c.id.split("-")[0] for c in CASES}
    assert {"config", "corpus", "tokenizer", "paths", "checkpoint", "task", "score", "select", "regroup", "mix",
            "report", "evaluate"} <= kinds


# ---------------------------------------------------------------- as subprocesses: the real exit status

@pytest.mark.parametrize("what", ["duplicate-key", "null-id"])
def test_the_command_exits_2_with_one_line_as_a_process(what, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [GOOD[0], {"id": None, "text": "x"}])
    config = write_config(tmp_path / "cfg.yaml", {"paths": ["c.jsonl"]})
    if what == "duplicate-key":
        config.write_text(config.read_text() + "run: {id: again}\n")
    step = "config" if what == "duplicate-key" else "prepare"
    proc = subprocess.run([sys.executable, "-m", "automixer_ops", step, "-c", str(config)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    needle = "duplicate key 'run'" if what == "duplicate-key" else "c.jsonl:2: id field 'id' is null"
    assert_one_line_error(proc.returncode, proc.stderr, 2, [needle])
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- DAG Params: refused before any command runs

def params(**kw) -> dict:
    return {"config": "/runs/configs/x.yaml", "backend": "local", "overrides": [], **kw}


PARAM_CASES = [
    ("overrides-newline", params(overrides=["run.id=a\ntouch PWNED"]), ["Param 'overrides'", "U+000A"]),
    ("overrides-yaml-escaped-newline", params(overrides=['run.id="a\\nb"']), ["Param 'overrides' (run.id)", "U+000A"]),
    ("overrides-run-root", params(overrides=["run.root=/tmp/elsewhere"]), ["'run.root' cannot be set"]),
    ("overrides-corpus-paths", params(overrides=["corpus.paths=[/etc/passwd]"]), ["'corpus.paths' cannot be set"]),
    ("overrides-checkpoints", params(overrides=["proxy.checkpoints=[{step: 1, path: /x}]"]),
     ["'proxy.checkpoints' cannot be set"]),
    ("overrides-custom-tasks", params(overrides=["tasks.custom=[]"]), ["'tasks.custom' cannot be set"]),
    ("overrides-memory-limit", params(overrides=["regroup.memory_limit=1TB"]), ["'regroup.memory_limit' cannot be set"]),
    ("overrides-not-a-list", params(overrides="run.id=x"), ["Param 'overrides': must be a list"]),
    ("overrides-without-equals", params(overrides=["run.id"]), ["Param 'overrides': 'run.id' is not section.key=value"]),
    ("config-newline", params(config="/runs/x.yaml\n--set run.root=/"), ["Param 'config'", "U+000A"]),
    ("config-bidi-override", params(config="/runs/\u202ex.yaml"), ["Param 'config'", "U+202E"]),
    ("tasks-escape", params(tasks=["piqa\x1b[2J"]), ["Param 'tasks'", "U+001B"]),
    ("nested-value-tab", params(notes={"a": ["x\ty"]}), ["Param 'notes'", "U+0009"]),
]


@pytest.mark.parametrize("name, p, needles", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_params_fail_the_task_in_one_line_without_retry(name, p, needles):
    with pytest.raises(AirflowFailException) as e:
        config_overrides(p)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg


@pytest.mark.parametrize("where", ["backend-settings-outside", "unknown-backend"])
def test_bad_backend_params_fail_the_task(where, tmp_path):
    from automixer_launcher.step_operator import AutomixerStepOperator

    rogue = tmp_path / "backends.yaml"
    rogue.write_text("local: {env: {PYTHONPATH: /tmp/evil}}\n")
    p = params(backend_settings=str(rogue)) if where == "backend-settings-outside" else params(backend="ssh")
    with pytest.raises(AirflowFailException) as e:
        AutomixerStepOperator(task_id="prepare", step="prepare").backend({"params": p})
    assert ("Param 'backend_settings'" if where == "backend-settings-outside" else "backend 'ssh'") in str(e.value)


# Params the launcher lets through (allowed keys, single-line) that the step itself refuses: exit 2, one line.
PARAM_CLI_CASES = [
    ("lr-nan", params(overrides=["proxy.lr=.nan"]), ["proxy.lr: must be a finite number"]),
    ("seed-2-70", params(overrides=[f"run.seed={2**70}"]), ["run.seed"]),
    ("grad-clip-negative", params(overrides=["proxy.grad_clip=-1"]), ["proxy.grad_clip: must be >= 0"]),
    ("token-budget-2-70", params(token_budget=2**70), ["mix.token_budget"]),
    ("keep-fraction-above-1", params(keep_fraction=1.5), ["regroup.keep_fraction: must be in (0, 1]"]),
    ("duplicate-key-in-override", params(overrides=["mix.caps=[{group: a, group: b, max_tokens: 1}]"]),
     ["duplicate key 'mix.caps[0].group'"]),
]


@pytest.mark.parametrize("name, p, needles", PARAM_CLI_CASES, ids=[c[0] for c in PARAM_CLI_CASES])
def test_params_the_step_refuses_exit_2_in_one_line(name, p, needles, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(BASE)
    argv = cli_argv("config", [], {**p, "config": str(config)})
    before = snapshot(tmp_path)
    rc = main(argv[1:])
    assert_one_line_error(rc, capsys.readouterr().err, 2, needles)
    assert snapshot(tmp_path) == before


def test_only_the_transient_status_is_retried():
    argv = ["automixer", "score"]
    assert type(command_failed(argv, 75)) is AirflowException  # retried
    assert isinstance(command_failed(argv, 2), AirflowFailException)
    assert isinstance(command_failed(argv, 1), AirflowFailException)
    assert isinstance(command_failed(argv, "-9 (signal 9)"), AirflowFailException)
    assert type(command_failed(argv, 0, lost=True)) is AirflowException  # a Slurm node failed under the job
