"""The run's tokenizer: a local Hugging Face tokenizer, or a byte-level BPE trained here.

Whatever its origin, the tokenizer is saved into the run directory with save_pretrained,
so every later step (proxy training, evaluation, scoring) loads the very same one with
`AutoTokenizer.from_pretrained(<run>/tokenizer)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from automixer_ops.config import TokenizerSection
from automixer_ops.errors import ConfigError

EOS = "<|endoftext|>"  # separates packed documents; also used as BOS
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], section: TokenizerSection):
    """Train a byte-level BPE (GPT-2 style) on a stream of texts; returns a HF tokenizer.

    The trainer's memory grows with the number of distinct words seen, not with the
    corpus size, and `train_max_chars` caps how much text it sees at all.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=section.vocab_size,
        min_frequency=section.min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_capped(texts, section.train_max_chars), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=section.model_max_length)


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        yield text
        seen += len(text)
        if seen >= max_chars:
            return


def load_tokenizer(path: Path, section: TokenizerSection):
    """Load a local HF tokenizer directory; it must be a fast (Rust) tokenizer."""
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise ConfigError(f"tokenizer.path: {path} is not a directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for a bad directory
        raise ConfigError(f"tokenizer.path: cannot load a tokenizer from {path}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"tokenizer.path: {path} is not a fast (tokenizers) tokenizer")
    if tok.eos_token is None:
        raise ConfigError(f"tokenizer.path: {path} defines no eos_token, which packing needs")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = section.model_max_length
    return tok


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Tokens per text, without special tokens (batched in Rust, on all cores)."""
    # encode_batch_fast skips character offsets, which we do not need.
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return [len(e.ids) for e in encodings]
