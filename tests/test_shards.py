"""Large-corpus preparation (data/shards.py): streamed documents, a tokenizer trained on a stated sample, parallel
tokenizing into whole-document shards, the split rule of the default preparation, resume after a kill, and the
trainer reading the shards lazily."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data.config import DataConfig
from data.prepare import ShardedTokens, load_prepared, name_fraction, split_documents_at_bos, token_chunks
from data.shards import prepare_shards
from llama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, stdlib_docs):
    """300 standard-library files as one jsonl corpus (name in "id", text in "text")."""
    path = tmp_path_factory.mktemp("corpus") / "code.jsonl"
    with open(path, "w") as f:
        for d in stdlib_docs[:300]:
            f.write(json.dumps({"id": d.name, "text": d.text}) + "\n")
    return path


def config(jsonl, tmp_path) -> DataConfig:
    return DataConfig(corpus=str(jsonl), vocab_size=500, cache_dir=str(tmp_path / "cache"), tokenizer_max_chars=400_000)


def test_shards_hold_every_document_tokenized_as_alone_split_by_name(jsonl, tmp_path):
    cfg = config(jsonl, tmp_path)
    data = prepare_shards(cfg, tmp_path / "p", workers=2, shard_tokens=20_000, progress=False)
    m = data.manifest
    assert m["version"] == 2 and len(m["shards"]["train"]) > 3 and m["dtype"] == "uint16"
    assert isinstance(data.train, ShardedTokens) and len(data.train) == m["splits"]["train"]["tokens"]
    # every document, as the tokenizer encodes it alone, in the stream's order, in the split its name decides
    tok = Tokenizer(tmp_path / "p" / "tokenizer.model")
    rows = [json.loads(line) for line in open(jsonl)]
    texts = {"train": [], "val": []}
    for i, r in enumerate(rows):  # (a jsonl corpus names its documents by row)
        texts["val" if name_fraction(f"row-{i}") < cfg.val_fraction else "train"].append(r["text"])
    for split in ("train", "val"):
        expected = np.concatenate([np.asarray(x) for x in tok.encode_batch(texts[split], bos=True, eos=True)])
        got = np.concatenate(list(token_chunks(getattr(data, split), 10_000)))
        assert np.array_equal(got, expected), split
    # each shard holds whole documents: it starts with <s> and ends with </s>
    for a in data.train.arrays:
        assert a[0] == tok.bos_id and a[-1] == tok.eos_id
    # slices across shard boundaries read as one sequence
    edge = int(data.train.starts[1])
    whole = np.asarray(data.train)
    assert np.array_equal(data.train[edge - 5 : edge + 7], whole[edge - 5 : edge + 7])
    assert data.train[edge] == whole[edge] and len(split_documents_at_bos(data.val, tok.bos_id)) == len(texts["val"])
    # prepared again: found, not redone; another corpus or settings into the same folder: one line
    assert prepare_shards(cfg, tmp_path / "p", workers=2, progress=False).from_cache
    with pytest.raises(ValueError, match="another corpus or settings"):
        prepare_shards(DataConfig(**{**cfg.__dict__, "vocab_size": 600}), tmp_path / "p", progress=False)


@pytest.mark.slow
def test_a_killed_preparation_goes_on_where_it_stopped(jsonl, tmp_path):
    """kill -9 after the first shards are written; the same command again finishes, and its shards equal an
    uninterrupted preparation's token for token."""
    cfg = config(jsonl, tmp_path)
    whole = prepare_shards(cfg, tmp_path / "whole", workers=2, shard_tokens=30_000, progress=False)
    argv = [sys.executable, "-m", "data.shards", "--corpus", str(jsonl), "--vocab-size", "500", "--out"]
    argv += [str(tmp_path / "k"), "--shard-tokens", "30000", "--workers", "2", "--tokenizer-max-chars", "400000"]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stage = tmp_path / ".k.partial"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (stage / "progress.json").is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (stage / "progress.json").is_file() and not (tmp_path / "k").exists()
    done_before = json.loads((stage / "progress.json").read_text())["docs"]
    assert 0 < done_before < 300
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    resumed = load_prepared(tmp_path / "k")
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(getattr(resumed, split)), np.asarray(getattr(whole, split)))


def test_a_run_trains_on_a_prepared_folder(jsonl, tmp_path, make_config):
    from training.trainer import train

    cfg = config(jsonl, tmp_path)
    prepare_shards(cfg, tmp_path / "p", workers=1, shard_tokens=40_000, progress=False)
    run = make_config(tmp_path, max_steps=3, ckpt_interval=3)
    run.data = DataConfig(corpus=str(tmp_path / "p"), vocab_size=500)
    run.model.vocab_size = 500
    summary = train(run)
    assert summary.steps == 3 and summary.train_tokens_available == len(load_prepared(tmp_path / "p").train)
    run = make_config(tmp_path / "b", max_steps=3)
    run.data = DataConfig(corpus=str(tmp_path / "p"), vocab_size=1000)
    with pytest.raises(ValueError, match="prepared with a 500-token vocabulary, not --vocab-size 1000"):
        train(run)
