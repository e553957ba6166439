"""Corpus -> documents -> train/val split -> SentencePiece -> packed token files, cached by content hash.

``prepare(DataConfig())`` reads the corpus, trains (or reuses) a tokenizer on the train split, tokenizes each
split into one flat ``uint16``/``uint32`` file (``<s> doc </s> <s> doc </s> ...``) and writes a manifest. A
second call with the same corpus and settings finds the cache and returns at once.

    python -m data                      # the default corpus: prepare and print its statistics
    python -m data --corpus my_texts/ --file-glob '**/*.txt' --vocab-size 8000
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from filelock import FileLock

if TYPE_CHECKING:
    import torch

from common.cli import UserError, parse_args, run_main
from common.files import atomic_dir
from common.progress import Progress
from data.config import DataConfig
from llama.tokenizer import Tokenizer, train_tokenizer

MANIFEST_VERSION = 1
MANIFEST_VERSION_SHARDS = 2  # data/shards.py's: each split a list of shards
TOKENIZER_FORMAT = 3  # bump when train_tokenizer's options or encoding change, so caches are rebuilt
ENCODE_BATCH_DOCS = 64


@dataclass
class Document:
    name: str  # stable identity (relative path, or "row-N"); decides the split
    text: str


# ---------------------------------------------------------------------------------------------------------
# Reading a corpus


def default_corpus_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# Built-in corpora, always present offline: --corpus python-sources reads every .py file of the standard
# library and of the packages installed in this environment (292M characters, 84M tokens at a 32k vocabulary
# with requirements.txt), deduplicated by content. The standard library alone (no --corpus) stays the default.
PYTHON_SOURCES = "python-sources"


def _python_source_roots() -> list[tuple[str, Path]]:
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    for key in ("purelib", "platlib"):
        if Path(paths[key]) not in [r for _, r in roots]:
            roots.append(("site-packages" if key == "purelib" else "platlib", Path(paths[key])))
    return roots


def _read_python_sources(pattern: str) -> Iterator[Document]:
    """Every UTF-8 .py document of the roots, each text once (the first name in sorted order keeps it)."""
    seen = set()
    for prefix, root in _python_source_roots():
        for d in _read_folder(root, pattern, skip_installed=prefix == "stdlib"):
            digest = hashlib.sha256(d.text.encode("utf-8", errors="surrogatepass")).digest()
            if digest not in seen:
                seen.add(digest)
                yield Document(f"{prefix}/{d.name}", d.text)


def installed_packages() -> dict[str, str]:
    """Name -> version of every distribution in this environment: what python-sources was read from."""
    from importlib.metadata import distributions

    return dict(sorted((d.metadata["Name"], d.version) for d in distributions() if d.metadata["Name"]))


def _read_folder(root: Path, pattern: str, skip_installed: bool = True) -> Iterator[Document]:
    """The folder's text files in sorted order, read one at a time (a reader that stops early reads no more)."""
    skip = {"site-packages", "dist-packages", "__pycache__"} if skip_installed else {"__pycache__"}
    for path in sorted(root.glob(pattern)):
        rel = path.relative_to(root)
        # The standard library folder also holds installed packages; they are not the standard library.
        if not path.is_file() or skip & set(rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # not UTF-8 text (or unreadable): skipped, as documented
        if text.strip() and "\x00" not in text:  # NUL bytes: valid UTF-8, but a binary file, not text
            yield Document(rel.as_posix(), text)


def _read_with_datasets(source: str, cfg: DataConfig) -> Iterator[Document]:
    import datasets  # imported here: it is slow to import and only these corpora need it

    suffix = Path(source).suffix.lower()
    if Path(source).is_file() and suffix in (".jsonl", ".parquet"):  # streamed as read, no Arrow copy on disk
        return _read_jsonl(Path(source), cfg.text_field) if suffix == ".jsonl" else _read_parquet(Path(source), cfg)
    if Path(source).is_file():
        if suffix == ".txt":
            # A plain text file: documents are paragraphs (blocks separated by blank lines).
            ds = datasets.load_dataset("text", data_files=source, sample_by="paragraph", split="train")
        elif suffix in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=source, split="train")
        elif suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=source, split="train")
        else:
            raise UserError(f"corpus file {source} has an unsupported type; use .txt, .jsonl, .json or .parquet")
    else:
        ds = datasets.load_dataset(source, cfg.hf_config, split=cfg.hf_split)
    if cfg.text_field not in ds.column_names:
        raise UserError(
            f"corpus {source} has no column {cfg.text_field!r} (columns: {ds.column_names}); set --text-field"
        )
    return _rows(ds, cfg.text_field)


def _read_jsonl(path: Path, field: str) -> Iterator[Document]:
    """A JSON-lines file's documents, a line at a time (named by row, as the datasets library's rows are): a file of
    billions of tokens is never held whole, nor converted to a second copy first (datasets' Arrow cache)."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(
                    f"{path} line {i + 1} is not a JSON object; a .jsonl corpus holds one per line"
                ) from None
            if not isinstance(row, dict) or field not in row:
                raise UserError(f"corpus {path} has no column {field!r} (line {i + 1}); set --text-field")
            t = row[field]
            if isinstance(t, str) and t.strip():
                yield Document(f"row-{i}", t)


def _read_parquet(path: Path, cfg: DataConfig) -> Iterator[Document]:
    """A parquet file's documents, a record batch at a time (pyarrow), named by row."""
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several kinds for a file that is not parquet
        raise UserError(f"{path} is not a parquet file ({type(e).__name__}); check --corpus") from None
    if cfg.text_field not in f.schema_arrow.names:
        raise UserError(
            f"corpus {path} has no column {cfg.text_field!r} (columns: {f.schema_arrow.names}); set --text-field"
        )
    i = 0
    for batch in f.iter_batches(batch_size=1024, columns=[cfg.text_field]):
        for t in batch.column(0).to_pylist():
            if isinstance(t, str) and t.strip():
                yield Document(f"row-{i}", t)
            i += 1


def _rows(ds, field: str) -> Iterator[Document]:
    i = 0
    for batch in ds.select_columns([field]).iter(batch_size=1024):  # Arrow is memory-mapped: a batch at a time
        for t in batch[field]:
            if isinstance(t, str) and t.strip():
                yield Document(f"row-{i}", t)
            i += 1


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """The non-empty UTF-8 documents of the configured corpus, in a fixed order, read as they are asked for:
    a reader that needs only the first N tokens (an evaluation budget) never reads the rest. A clear error if
    there are none."""
    if cfg.corpus is None:
        source, docs = str(default_corpus_dir()), _read_folder(default_corpus_dir(), cfg.file_glob)
    elif cfg.corpus == PYTHON_SOURCES:
        source, docs = PYTHON_SOURCES, _read_python_sources(cfg.file_glob)
    else:
        source = cfg.corpus
        path = Path(source)
        if path.is_dir():
            docs = _read_folder(path, cfg.file_glob)
        elif path.is_file():
            if path.stat().st_size == 0:
                raise UserError(f"corpus file {path} is empty; point --corpus at a file with text")
            docs = _read_with_datasets(source, cfg)
        elif source.startswith(("/", ".", "~")) or path.suffix.lower() in (".txt", ".jsonl", ".json", ".parquet"):
            raise FileNotFoundError(f"corpus path {source} does not exist; check --corpus")
        else:
            try:
                docs = _read_with_datasets(source, cfg)
            except Exception as e:  # the datasets library raises many kinds; the user needs one line
                raise UserError(
                    f"could not load corpus {source!r} as a local path or Hugging Face dataset "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                    "check the name and network access, or pass a local folder/file"
                ) from None
    empty = True
    for d in docs:
        empty = False
        yield d
    if empty:
        raise UserError(
            f"corpus {source} holds no UTF-8 text documents (glob {cfg.file_glob!r}; binary files are skipped); "
            "point --corpus at text files or change --file-glob"
        )


def load_documents(cfg: DataConfig) -> list[Document]:
    """All non-empty UTF-8 documents of the configured corpus (iter_documents, read whole)."""
    return list(iter_documents(cfg))


def name_fraction(name: str) -> float:
    """Where a document's name falls in [0, 1): the hash that decides its split."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document: a document is held out iff the hash of its name falls below
    ``val_fraction``, so the split does not depend on order, machine or adding other documents."""
    if len(docs) < 2:
        raise UserError(f"the corpus has {len(docs)} document(s); a train/val split needs at least 2")

    def u(doc):
        return name_fraction(doc.name)

    scored = sorted(docs, key=u)
    n_val = sum(u(d) < val_fraction for d in docs)
    n_val = min(max(n_val, 1), len(docs) - 1)  # both splits non-empty even for tiny corpora
    val_names = {d.name for d in scored[:n_val]}
    train = [d for d in docs if d.name not in val_names]
    val = [d for d in docs if d.name in val_names]
    return train, val


def corpus_hash(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode())
        h.update(b"\0")
        h.update(d.text.encode("utf-8", errors="surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Prepared data on disk


class ShardedTokens:
    """A split kept as token shards (data/shards.py), read as one sequence: ``len`` and slices across shards, each
    shard memory-mapped, nothing read until it is sliced; ``arrays`` are the shards themselves."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.dtype = arrays[0].dtype if arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            k = int(np.searchsorted(self.starts, i, side="right")) - 1
            return self.arrays[k][i - self.starts[k]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("sharded tokens take contiguous slices only")
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        k = max(first, 0)
        while start < stop and k < len(self.arrays):
            lo, hi = start - self.starts[k], min(stop, self.starts[k + 1]) - self.starts[k]
            parts.append(np.asarray(self.arrays[k][lo:hi]))
            start = int(self.starts[k + 1])
            k += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None):  # np.asarray of a whole split: read it all (small splits only)
        out = np.concatenate([np.asarray(a) for a in self.arrays]) if self.arrays else np.zeros(0, self.dtype)
        return out if dtype is None else out.astype(dtype)


def token_chunks(tokens, size: int = 1 << 24):
    """A split's tokens a chunk at a time (a flat memmap or shards): what a pass over 2B tokens reads."""
    arrays = tokens.arrays if isinstance(tokens, ShardedTokens) else [tokens]
    for a in arrays:
        for i in range(0, len(a), size):
            yield np.asarray(a[i : i + size])


@dataclass
class PreparedData:
    dir: Path
    manifest: dict
    tokenizer: Tokenizer
    train: np.ndarray | ShardedTokens  # flat token ids (memmap), or the shards of a large corpus
    val: np.ndarray | ShardedTokens
    from_cache: bool = False  # found prepared by an earlier run

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def load_prepared(directory: str | os.PathLike) -> PreparedData:
    d = Path(directory)
    manifest_path = d / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{d} has no manifest.json; prepare the data with `python -m data`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") not in (MANIFEST_VERSION, MANIFEST_VERSION_SHARDS):
        raise UserError(
            f"{manifest_path} is format {manifest.get('version')}, expected {MANIFEST_VERSION} or "
            f"{MANIFEST_VERSION_SHARDS}"
        )
    dtype = np.dtype(manifest["dtype"])
    if manifest["version"] == MANIFEST_VERSION_SHARDS:  # data/shards.py: each split a list of shards
        splits = {}
        for split in ("train", "val"):
            arrays = []
            for shard in manifest["shards"][split]:
                path, n = d / shard["file"], shard["tokens"]
                if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
                    raise UserError(f"{path} is missing or truncated; prepare {d} again (python -m data.shards)")
                arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)))
            splits[split] = ShardedTokens(arrays)
        return PreparedData(d, manifest, Tokenizer(d / "tokenizer.model"), splits["train"], splits["val"])
    arrays = {}
    for split in ("train", "val"):
        path = d / f"{split}.bin"
        n = manifest["splits"][split]["tokens"]
        if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
            raise UserError(f"{path} is missing or truncated; delete {d} and prepare again")
        arrays[split] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    tok = Tokenizer(d / "tokenizer.model")
    return PreparedData(d, manifest, tok, arrays["train"], arrays["val"])


def _settings_key(cfg: DataConfig) -> str:
    # Only the settings that change the output; cache_dir and the corpus location are not among them.
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("cache_dir", "corpus")}
    keep["tokenizer_format"] = TOKENIZER_FORMAT
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:10]


def _write_tokens(tok: Tokenizer, docs: list[Document], path: Path, dtype, desc: str, progress: bool) -> int:
    n = 0
    with open(path, "wb") as f, Progress(total=len(docs), desc=desc, unit="doc", disable=not progress) as bar:
        for i in range(0, len(docs), ENCODE_BATCH_DOCS):
            batch = docs[i : i + ENCODE_BATCH_DOCS]
            for ids in tok.encode_batch([d.text for d in batch], bos=True, eos=True):
                arr = np.asarray(ids, dtype=dtype)
                arr.tofile(f)
                n += arr.size
            bar.update(len(batch))
    return n


def _split_stats(docs: list[Document], tokens: int) -> dict:
    chars = sum(len(d.text) for d in docs)
    nbytes = sum(len(d.text.encode("utf-8", errors="surrogatepass")) for d in docs)
    return {"docs": len(docs), "chars": chars, "bytes": nbytes, "tokens": tokens}


def prepare(cfg: DataConfig, progress: bool = True) -> PreparedData:
    """Prepare (or find in the cache) the tokenizer and token files for ``cfg``."""
    t0 = time.perf_counter()
    if cfg.corpus is not None and (Path(cfg.corpus) / "manifest.json").is_file():  # a prepared folder (data.shards)
        data = load_prepared(cfg.corpus)
        if data.vocab_size != cfg.vocab_size:
            raise UserError(
                f"--corpus {cfg.corpus} is prepared with a {data.vocab_size}-token vocabulary, not --vocab-size "
                f"{cfg.vocab_size}; pass --vocab-size {data.vocab_size}"
            )
        data.from_cache = True
        return data
    docs = load_documents(cfg)
    chash = corpus_hash(docs)
    out = Path(cfg.cache_dir) / f"{chash[:16]}-v{cfg.vocab_size}-{_settings_key(cfg)}"
    if (out / "manifest.json").is_file():
        data = load_prepared(out)
        data.from_cache = True
        return data
    # Two processes that need the same preparation (a study's two workers) do it once: the second waits for the
    # first's lock, then finds its cache. The lock is the OS's, released however its holder ends.
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.parent / f".{out.name}.lock"):
        if (out / "manifest.json").is_file():
            data = load_prepared(out)
            data.from_cache = True
            return data
        return _prepare_into(cfg, docs, chash, out, t0, progress)


def _prepare_into(cfg: DataConfig, docs, chash: str, out: Path, t0: float, progress: bool) -> PreparedData:
    load_s = time.perf_counter() - t0

    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    # Everything is written into a temporary folder renamed into place at the end: an interrupted
    # preparation leaves no half-written cache that a later run would trust; if another process finished
    # the same preparation first, theirs is kept.
    with atomic_dir(out, replace=False) as tmp:
        t1 = time.perf_counter()
        if progress:
            print(f"training a {cfg.vocab_size}-token SentencePiece BPE on {len(train_docs)} documents ...")
        tok = train_tokenizer(
            (d.text for d in train_docs), tmp / "tokenizer.model", cfg.vocab_size, max_chars=cfg.tokenizer_max_chars
        )
        tokenizer_s = time.perf_counter() - t1
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        t2 = time.perf_counter()
        n_train = _write_tokens(tok, train_docs, tmp / "train.bin", dtype, "tokenize train", progress)
        n_val = _write_tokens(tok, val_docs, tmp / "val.bin", dtype, "tokenize val", progress)
        tokenize_s = time.perf_counter() - t2
        manifest = {
            "version": MANIFEST_VERSION,
            "corpus": {"source": cfg.corpus or str(default_corpus_dir()), "hash": chash, "docs": len(docs)},
            **({"packages": installed_packages()} if cfg.corpus == PYTHON_SOURCES else {}),
            "settings": dataclasses.asdict(cfg),
            "tokenizer": {"sha256": tok.sha256(), "vocab_size": tok.vocab_size},
            "dtype": np.dtype(dtype).name,
            "splits": {"train": _split_stats(train_docs, n_train), "val": _split_stats(val_docs, n_val)},
            "val_names": [d.name for d in val_docs],  # the held-out documents, in the order val.bin holds them
            "timings_s": {
                "load": round(load_s, 3),
                "tokenizer": round(tokenizer_s, 3),
                "tokenize": round(tokenize_s, 3),
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return load_prepared(out)


def describe(data: PreparedData) -> str:
    m = data.manifest
    lines = [
        f"data: {data.dir}",
        f"corpus: {m['corpus']['source']} ({m['corpus']['docs']} documents)",
        f"tokenizer: vocab {m['tokenizer']['vocab_size']}, sha256 {m['tokenizer']['sha256'][:12]}",
    ]
    for split, s in m["splits"].items():
        lines.append(
            f"{split:5s}: {s['docs']:6d} docs {s['chars']:>11,d} chars {s['tokens']:>10,d} tokens "
            f"{s['chars'] / s['tokens']:.2f} chars/token {s['bytes'] / s['tokens']:.2f} bytes/token"
        )
    t = m["timings_s"]
    lines.append(
        f"prepared in: load {t['load']:.1f} s, tokenizer {t['tokenizer']:.1f} s, tokenize {t['tokenize']:.1f} s"
        + (" (by an earlier run; this one read the cache)" if data.from_cache else "")
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Batches for training


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens; batch ``step`` depends only on (seed, step).

    The whole global batch is drawn for a step and each rank / micro-step takes its slice, so a run gives
    the same batches on any number of processes and resuming at step N needs no saved sampler state.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise UserError(
                f"this split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}; "
                "use a shorter seq_len or a larger corpus"
            )
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed

    def get(self, step: int, start: int = 0, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``start:start+count`` of batch ``step`` as (inputs, targets), each (count, seq_len) int64."""
        rng = np.random.default_rng([self.seed, step])
        offsets = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.global_batch)
        offsets = offsets[start : start + (self.global_batch if count is None else count)]
        rows = np.stack([np.asarray(self.tokens[o : o + self.seq_len + 1], dtype=np.int64) for o in offsets])
        import torch  # here, not at the top: preparing data (and its worker processes) never needs torch

        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


def main(argv: list[str] | None = None):
    cfg = parse_args(DataConfig(), argv)
    data = prepare(cfg)
    print(describe(data))


def split_documents_at_bos(tokens: np.ndarray, bos_id: int) -> list[np.ndarray]:
    """The packed stream ``<s> doc </s> <s> doc </s> ...`` back into one array per document (without <s>)."""
    starts = np.flatnonzero(np.asarray(tokens) == bos_id)
    ends = list(starts[1:]) + [len(tokens)]
    return [np.asarray(tokens[s + 1 : e]) for s, e in zip(starts, ends, strict=True)]


def heldout_documents(tokens: np.ndarray, tokenizer) -> list[np.ndarray]:
    """The packed held-out stream back into each document's own tokens, without its <s> and </s>."""
    docs = split_documents_at_bos(tokens, tokenizer.bos_id)
    return [d[:-1] if len(d) and d[-1] == tokenizer.eos_id else d for d in docs]


class Prefetcher:
    """The next micro-batch read (and, on CUDA, pinned and copied without blocking) in a background thread while
    the current step runs, as nanoGPT's loader prefetches; batches are the sampler's, so resume is unchanged."""

    def __init__(self, sampler: BatchSampler, device: torch.device):
        self.sampler, self.device = sampler, device
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.pending: tuple | None = None  # (key, future)

    def _load(self, step: int, start: int, count: int):
        x, y = self.sampler.get(step, start=start, count=count)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def get(self, key: tuple[int, int, int], following: tuple[int, int, int] | None):
        """Batch ``key`` = (step, start, count); starts reading ``following`` before returning."""
        if self.pending is not None and self.pending[0] == key:
            batch = self.pending[1].result()
        else:
            batch = self._load(*key)
        self.pending = None if following is None else (following, self.pool.submit(self._load, *following))
        return batch

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def unigram_losses(train: np.ndarray, val: np.ndarray, vocab_size: int) -> dict:
    """Cross-entropy (nats/token) of a unigram model fit on the training tokens: the bar to clear."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for chunk in token_chunks(train):  # a chunk at a time: 2B tokens never in memory at once
        counts += np.bincount(chunk, minlength=vocab_size)
    counts += 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    val_counts = np.zeros(vocab_size, dtype=np.float64)
    for chunk in token_chunks(val):
        val_counts += np.bincount(chunk, minlength=vocab_size)
    return {
        "unigram_train_loss": float(-(counts - 1) @ logp / (counts - 1).sum()),
        "unigram_val_loss": float(-(val_counts @ logp) / val_counts.sum()),
    }


if __name__ == "__main__":
    run_main(main)
