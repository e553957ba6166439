"""The held-out split as documents with identities (index, name, content hash), and the rule that leaves out
held-out documents that are near-duplicates of training files.

The rule, fixed before any model is scored: a held-out document is a near-duplicate when at least a given
fraction of its long lines (30 or more characters once stripped) occur verbatim in the training split. In the
standard library it catches generated tables (``encodings/cp865.py``: 99% of its long lines are in other
code pages' files) that measure recall of training text rather than modelling. Written here because the
field's deduplication tools (MinHash, suffix arrays) answer another question, which files of one corpus are
alike, and need a pass over it; this is one set of the training split's lines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

from data.config import DataConfig
from data.prepare import (
    PreparedData,
    ShardedTokens,
    corpus_hash,
    heldout_documents,
    load_documents,
    load_prepared,
    split_documents,
)
from llama.model_io import STATE_FILE, resolve_checkpoint, tokenizer_path
from llama.tokenizer import Tokenizer

LONG_LINE_CHARS = 30  # a line counts for the rule from this many characters (stripped): not "return x" or "}"


@dataclass(frozen=True)
class HeldOutDocument:
    index: int  # its position in the held-out split (val.bin's order)
    name: str | None  # its name in the corpus (a path); None where the preparation did not record names
    sha256: str  # the first 16 hex digits of its text's SHA-256: the same document under any tokenizer
    text: str
    overlap: float | None = None  # fraction of its long lines found verbatim in the training split (None: not asked)


def long_lines(text: str, min_chars: int = LONG_LINE_CHARS) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines()) if len(s) >= min_chars]


def train_overlap(train_texts: Iterable[str], texts: list[str], min_chars: int = LONG_LINE_CHARS) -> list[float]:
    """For each of ``texts``, the fraction of its long lines that occur verbatim in ``train_texts`` (0 where it
    has none)."""
    seen: set[str] = set()
    for t in train_texts:
        seen.update(long_lines(t, min_chars))
    out = []
    for t in texts:
        lines = long_lines(t, min_chars)
        out.append(sum(line in seen for line in lines) / len(lines) if lines else 0.0)
    return out


def heldout_names(data: PreparedData) -> list[str] | None:
    """The held-out documents' names: recorded by the preparation, or (for data prepared before names were
    recorded) found again in its corpus when that corpus is a local folder still holding the same files."""
    names = data.manifest.get("val_names")
    if names is not None:
        return list(names)
    settings = dict(data.manifest.get("settings") or {})
    corpus = settings.get("corpus")
    if corpus is not None and not os.path.isdir(corpus):
        return None  # a file or a dataset: reading it again is not worth a name
    try:
        docs = load_documents(DataConfig(**settings))
    except (OSError, ValueError, TypeError):
        return None
    if corpus_hash(docs) != data.manifest["corpus"]["hash"]:
        return None  # the folder changed since: its names may not be these documents'
    return [d.name for d in split_documents(docs, settings.get("val_fraction", 0.05))[1]]


def heldout_set(data: PreparedData, near_duplicates: float | None = None):
    """(kept, left out): every held-out document, and those whose overlap with the training split reaches
    ``near_duplicates`` (None: none left out, overlap not computed)."""
    tok = data.tokenizer
    texts = [tok.decode(d) for d in heldout_documents(data.val, tok)]
    names = heldout_names(data)
    if names is not None and len(names) != len(texts):
        names = None
    overlap: list[float | None] = [None] * len(texts)
    if near_duplicates is not None:
        shards = data.train.arrays if isinstance(data.train, ShardedTokens) else [data.train]  # whole docs each
        train = (tok.decode(d) for a in shards for d in heldout_documents(a, tok))  # the training split, cut alike
        overlap = train_overlap(train, texts)
    docs = [
        HeldOutDocument(i, names[i] if names else None, hashlib.sha256(t.encode()).hexdigest()[:16], t, overlap[i])
        for i, t in enumerate(texts)
    ]
    if near_duplicates is None:
        return docs, []
    return [d for d in docs if d.overlap < near_duplicates], [d for d in docs if d.overlap >= near_duplicates]


@dataclass
class HeldOut:
    """Score the held-out documents of ``checkpoint``'s training data, as text: how a model with another
    tokenizer (a Hugging Face model) is measured on the same text as this project's models."""

    checkpoint: str


def model_data(checkpoint: str | os.PathLike) -> PreparedData:
    """The prepared data a model folder (a checkpoint, or a compressed model that keeps its base's state) was
    trained on, as its state.json names it; one line where it names none or the data is gone."""
    folder = resolve_checkpoint(checkpoint)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{folder} has no {STATE_FILE}, so its training data is unknown; pass --corpus")
    state = json.loads(state_path.read_text())
    if not state.get("data_dir"):
        raise FileNotFoundError(f"{state_path} names no training data; pass --corpus")
    try:
        return load_prepared(state["data_dir"])
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the training data of {folder} ({state['data_dir']}) is gone; prepare it again with the run's data "
            "settings (python -m data ...) or pass --corpus"
        ) from None


def heldout_texts(checkpoint: str | os.PathLike) -> list[str]:
    """The held-out documents of a checkpoint's training data, decoded with the checkpoint's tokenizer."""
    data = model_data(checkpoint)
    tok = Tokenizer(tokenizer_path(checkpoint))
    return [tok.decode(d) for d in heldout_documents(data.val, tok)]
