"""Checkpoints of a run: which exist, which tokenizer each uses, and their identity.

Shared by the steps that load checkpoints (train-proxy, evaluate, score), so that none of
them imports another step.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.rundir import SUCCESS, RunDir, fingerprint

TRAINER_STATE = "trainer_state.pt"


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"


def list_checkpoints(run: RunDir) -> dict[int, Path]:
    """Complete checkpoints of the run by step (trained or linked)."""
    out = {}
    for p in run.checkpoints.glob("step-*"):
        if p.name[5:].isdigit() and ((p / SUCCESS).is_file() or (p / "config.json").is_file()):
            out[int(p.name[5:])] = p
    return dict(sorted(out.items()))


def checkpoint_tokenizer_dir(run: RunDir, ckpt: Path) -> Path:
    """A checkpoint's own tokenizer when it has one (ours always do), else the run's."""
    return ckpt if (ckpt / "tokenizer_config.json").is_file() else run.tokenizer


def checkpoint_identity(ckpt: Path) -> str:
    """Which weights a result belongs to: the resolved directory and its files' sizes and times."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt.resolve().iterdir()
                   if p.is_file() and p.name != TRAINER_STATE)
    return fingerprint([str(ckpt.resolve()), files])


def load_causal_lm(ckpt: Path, dtype):
    """The checkpoint's model, never running code shipped with it; a checkpoint that cannot be loaded (damaged
    after it was linked, say) fails with one line naming it."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype, trust_remote_code=False)
    except Exception as e:  # transformers and safetensors raise OSError, ValueError, SafetensorError, ...
        raise AutomixerError(f"{ckpt}: cannot load the model: {_first_line(e)}") from None


# ---------------------------------------------------------------- checks of a user's checkpoint

def check_checkpoint_dir(src: Path, where: str) -> dict:
    """What a linked checkpoint must be for evaluate and score to load it: a causal LM of an architecture
    transformers ships (code shipped with a checkpoint is never run: no trust_remote_code), with whole weight
    files. Cheap: reads config.json and the weight files' headers, not the weights. Returns config.json."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{where}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config.json must be a JSON object")
    _check_architecture(config, where)
    _check_weight_files(src, where)
    return config


def _check_architecture(config: dict, where: str) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if config.get("auto_map"):
        raise ConfigError(f"{where}: config.json has auto_map ({', '.join(map(str, config['auto_map']))}): the model "
                          "needs trust_remote_code (Python code shipped with the checkpoint), which AutoMixer never "
                          "runs; convert it to an architecture transformers ships")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ConfigError(f"{where}: config.json model_type {model_type!r} is not an architecture transformers "
                          "ships (custom code would need trust_remote_code, which AutoMixer never runs)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{where}: model_type {model_type!r} is not a causal language model")


def _check_weight_files(src: Path, where: str) -> None:
    safetensors, pickles = sorted(src.glob("*.safetensors")), sorted(src.glob("*.bin"))
    if not safetensors and not pickles:
        raise ConfigError(f"{where}: holds no model weights (*.safetensors or *.bin)")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ConfigError(f"{where}: {index_name} is not a valid weight index ({e})") from None
            missing = sorted(s for s in shards if not (src / s).is_file())
            if missing:
                raise ConfigError(f"{where}: {index_name} lists weight file(s) that are missing: {', '.join(missing)}")
    for path in safetensors:  # transformers loads these when present, so only they need to be whole
        _check_safetensors(path, where)
    if not safetensors:
        for path in pickles:
            if not zipfile.is_zipfile(path):  # torch.save's format; a truncated file loses its central directory
                raise ConfigError(f"{where}: {path.name} is truncated or not a PyTorch weights file")


def _check_safetensors(path: Path, where: str) -> None:
    """The file is as long as its header says: 8 bytes of header length, the JSON header, then the tensors."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ConfigError(f"{where}: {path.name} is not a readable safetensors file ({e})") from None
    if size != 8 + n + end:
        raise ConfigError(f"{where}: {path.name} is truncated or damaged: {size:,} bytes, its header describes "
                          f"{8 + n + end:,}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
