"""A corpus of billions of tokens prepared in bounded memory: documents streamed (never all held at once), the
tokenizer trained on a stated sample, documents tokenized by parallel processes, written as fixed-size token
shards (uint16 where the vocabulary fits) with a manifest, resumable after a kill, a progress bar in tokens.

    python -m data.shards --corpus my_code.jsonl --vocab-size 32000 --out data_cache/code --workers 8
    python -m runners.baseline_8_layer --corpus data_cache/code        # a run trains on the prepared folder

The result is a prepared folder as ``python -m data`` writes (manifest version 2: the splits as lists of
shards), read lazily by the trainer (``data.prepare.ShardedTokens``: each shard memory-mapped), so a 2B-token
run needs no more memory than a 2M-token one. The split is the default preparation's rule, applied per document
as it streams by: a document is held out iff the hash of its name falls below ``val_fraction``. Each shard holds
whole documents (``<s> doc </s> ...``) and is written atomically; ``progress.json`` records how many documents of
the stream are in finished shards, so a killed preparation goes on from there (the same corpus, the same settings).
The same process with tiktoken in place of SentencePiece is nanoGPT's FineWeb recipe (bench/data_prep.py times
both side by side).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from common.cli import UserError, parse_args, run_main
from common.files import atomic_write
from common.progress import Progress
from data import tokenize_worker
from data.config import DataConfig
from data.prepare import MANIFEST_VERSION_SHARDS, iter_documents, load_prepared, name_fraction
from llama.tokenizer import Tokenizer, train_tokenizer

BATCH_DOCS = 256  # documents per task a worker tokenizes at most ...
BATCH_CHARS = 1 << 20  # ... and characters: a task is small beside a shard, and memory stays bounded


@dataclass
class ShardArgs:
    data: DataConfig = field(default_factory=DataConfig)  # the corpus and tokenizer settings (python -m data's)
    out: str = ""  # the prepared folder to write (required)
    workers: int = 0  # tokenizing processes (0: every core)
    shard_tokens: int = 100_000_000  # tokens per shard at least (a shard holds whole documents)


def _batches(docs: Iterator, n: int, chars: int = BATCH_CHARS) -> Iterator[list]:
    """Documents in tasks of at most ``n`` documents or about ``chars`` characters."""
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d.text)
        if len(batch) >= n or size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _source_fingerprint(cfg: DataConfig) -> str:
    """Which corpus and settings a folder is for: a resume with another corpus or settings is refused."""
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class ShardWriter:
    """One split's shards: tokens gathered in memory up to ``shard_tokens``, then written whole (temporary name,
    renamed) at a document boundary."""

    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int, done: list[dict]):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards = list(done)
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def add(self, ids: np.ndarray):
        self.pending.append(ids)
        self.pending_tokens += len(ids)

    @property
    def full(self) -> bool:
        return self.pending_tokens >= self.shard_tokens

    def flush(self):
        if not self.pending:
            return
        name = f"{self.split}_{len(self.shards):06d}.bin"
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "wb") as f:
            for a in self.pending:
                a.astype(self.dtype, copy=False).tofile(f)
        os.replace(tmp, self.folder / name)
        self.shards.append({"file": name, "tokens": self.pending_tokens})
        self.pending, self.pending_tokens = [], 0


def prepare_shards(cfg: DataConfig, out: Path, workers: int = 0, shard_tokens: int = 100_000_000, progress=True):
    """Prepare ``cfg``'s corpus into ``out`` (see the module's docstring); the finished folder's PreparedData."""
    if (out / "manifest.json").is_file():
        data = load_prepared(out)
        if data.manifest.get("source_fingerprint") != _source_fingerprint(cfg):
            raise UserError(f"{out} holds another corpus or settings' preparation; name another --out")
        data.from_cache = True
        return data
    if shard_tokens < 1000:
        raise UserError(f"--shard-tokens {shard_tokens}: give at least 1000 tokens per shard (100M is nanoGPT's)")
    workers = workers or os.cpu_count() or 1
    stage = out.with_name(f".{out.name}.partial")
    stage.mkdir(parents=True, exist_ok=True)
    state = _read_progress(stage, cfg)
    t0 = time.perf_counter()
    if not (stage / "tokenizer.model").is_file():  # the tokenizer on a stated sample of the training documents
        sample = (d.text for d in iter_documents(cfg) if name_fraction(d.name) >= cfg.val_fraction)
        train_tokenizer(sample, stage / "tokenizer.model", cfg.vocab_size, max_chars=cfg.tokenizer_max_chars)
    tok = Tokenizer(stage / "tokenizer.model")
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    writers = {s: ShardWriter(stage, s, dtype, shard_tokens, state["shards"][s]) for s in ("train", "val")}
    docs = iter_documents(cfg)
    skipped = sum(1 for _ in itertools.islice(docs, state["docs"]))  # finished in an earlier start
    if skipped != state["docs"]:
        raise UserError(f"the corpus holds {skipped} documents, fewer than {state['docs']} prepared before: it changed")
    bar = Progress(desc="tokens", unit="tok", initial=state["tokens"], disable=not progress)
    ctx = get_context("spawn")  # a clean interpreter per worker: no fork of a process holding threads
    with ctx.Pool(workers, initializer=tokenize_worker.init, initargs=(str(stage / "tokenizer.model"),)) as pool:
        pending = []  # (documents, async result): at most 2 per worker in flight, so memory stays bounded
        batches = _batches(docs, BATCH_DOCS)
        for batch in itertools.chain(batches, [None]):
            if batch is not None:
                pending.append(
                    (batch, pool.apply_async(tokenize_worker.tokenize, ((([d.text for d in batch]), dtype),)))
                )
            while pending and (batch is None or len(pending) >= 2 * workers):
                done_batch, result = pending.pop(0)
                for d, ids in zip(done_batch, result.get(), strict=True):
                    writers["val" if name_fraction(d.name) < cfg.val_fraction else "train"].add(ids)
                    state["tokens"] += len(ids)
                    state["docs"] += 1
                    bar.update(len(ids))
                    if writers["train"].full or writers["val"].full:  # both flushed: progress is a count of documents
                        for w in writers.values():
                            w.flush()
                        _write_progress(stage, cfg, state, writers)
    for w in writers.values():
        w.flush()
    bar.close()
    if not writers["train"].shards or not writers["val"].shards:
        raise UserError(
            f"the corpus gave {'no held-out' if writers['train'].shards else 'no training'} documents at "
            f"val_fraction {cfg.val_fraction}: use python -m data for a small corpus, or another --val-fraction"
        )
    manifest = {
        "version": MANIFEST_VERSION_SHARDS,
        "corpus": {"source": cfg.corpus, "docs": state["docs"]},
        "source_fingerprint": _source_fingerprint(cfg),
        "settings": dataclasses.asdict(cfg),
        "tokenizer": {"sha256": tok.sha256(), "vocab_size": tok.vocab_size, "sample_chars": cfg.tokenizer_max_chars},
        "dtype": np.dtype(dtype).name,
        "shards": {s: w.shards for s, w in writers.items()},
        "splits": {s: {"tokens": sum(x["tokens"] for x in w.shards)} for s, w in writers.items()},
        "timings_s": {"this_start": round(time.perf_counter() - t0, 3)},
        "workers": workers,
    }
    atomic_write(stage / "manifest.json", json.dumps(manifest, indent=2))
    (stage / "progress.json").unlink(missing_ok=True)
    os.replace(stage, out)
    return load_prepared(out)


def _read_progress(stage: Path, cfg: DataConfig) -> dict:
    empty = {"docs": 0, "tokens": 0, "shards": {"train": [], "val": []}}
    path = stage / "progress.json"
    if not path.is_file():
        return empty | {"fingerprint": _source_fingerprint(cfg)}
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is damaged; delete {stage} to start the preparation over") from None
    if state.get("fingerprint") != _source_fingerprint(cfg):
        raise UserError(
            f"{stage} is a stopped preparation of another corpus or settings; delete it, or resume it with its own"
        )
    for split in ("train", "val"):  # shards written after the last progress record are rewritten
        kept = {s["file"] for s in state["shards"][split]}
        for f in stage.glob(f"{split}_*.bin"):
            if f.name not in kept:
                f.unlink()
    return state


def _write_progress(stage: Path, cfg: DataConfig, state: dict, writers: dict):
    state["shards"] = {s: w.shards for s, w in writers.items()}
    atomic_write(stage / "progress.json", json.dumps(state | {"fingerprint": _source_fingerprint(cfg)}))


def main(argv=None):
    a = parse_args(ShardArgs(), argv)
    if not a.out:
        raise UserError("name the prepared folder to write with --out (e.g. data_cache/my_corpus)")
    data = prepare_shards(a.data, Path(a.out), a.workers, a.shard_tokens)
    m = data.manifest
    print(
        f"{data.dir}: {m['splits']['train']['tokens']:,} training and {m['splits']['val']['tokens']:,} held-out "
        f"tokens in {len(m['shards']['train'])} + {len(m['shards']['val'])} shards ({m['dtype']}), "
        f"vocabulary {data.vocab_size}"
    )


if __name__ == "__main__":
    run_main(main)
