"""Which corpus, how it is split and tokenized: the settings of python -m data (and of every training run)."""

from __future__ import annotations

from dataclasses import dataclass

from common.cli import UserError


@dataclass
class DataConfig:
    # Where the text comes from: a folder, a .txt/.jsonl/.json/.parquet file, a Hugging Face dataset name
    # (needs network access), or "python-sources" (every .py of the standard library and the installed
    # packages, deduplicated: tens of millions of tokens offline). None = the standard library alone.
    corpus: str | None = None  # a folder, a file, an HF dataset, python-sources, or none (the standard library)
    file_glob: str = "**/*.py"  # which files of a folder corpus to read (non-UTF-8 files are skipped)
    text_field: str = "text"  # column holding the text in jsonl/parquet/HF datasets
    hf_config: str | None = None  # HF dataset configuration, e.g. "wikitext-2-raw-v1"
    hf_split: str = "train"  # HF dataset split to read
    val_fraction: float = 0.05  # share of documents held out, chosen by a hash of the document's name
    vocab_size: int = 32000  # SentencePiece vocabulary; the model's vocab_size is taken from the tokenizer
    tokenizer_max_chars: int = 100_000_000  # at most this much training text is read to train the tokenizer
    cache_dir: str = "data_cache"  # tokenizer and token shards, keyed by corpus and settings hashes

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data val_fraction={self.val_fraction} must be strictly between 0 and 1")
        if self.vocab_size < 260:
            raise UserError(f"data vocab_size={self.vocab_size} is too small: byte fallback alone needs 259")
        if self.tokenizer_max_chars <= 0:
            raise UserError(f"data tokenizer_max_chars={self.tokenizer_max_chars} must be positive")
        if not self.cache_dir:
            raise UserError("data cache_dir is empty; name a folder for the tokenizer and token files")
