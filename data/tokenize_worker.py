"""The worker of data/shards.py's tokenizing pool: a module of its own so that each worker process imports only
the tokenizer (sentencepiece and numpy), not the trainer's dependencies (torch): a worker starts in a fraction of a
second with a fraction of the memory."""

from __future__ import annotations

import numpy as np

from llama.tokenizer import Tokenizer

_tokenizer: Tokenizer | None = None  # one per worker process, set by init (the pool's way to give workers state)


def init(model_path: str):
    global _tokenizer
    _tokenizer = Tokenizer(model_path)


def tokenize(args) -> list[np.ndarray]:
    """A task: each text as <s> ids </s>, in the split's dtype."""
    texts, dtype = args
    return [np.asarray(x, dtype=dtype) for x in _tokenizer.encode_batch(texts, bos=True, eos=True, num_threads=1)]
