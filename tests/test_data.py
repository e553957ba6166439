import json
import random

import numpy as np
import pytest

import data.prepare as data_mod
from common.cli import ConfigError, apply_overrides
from data.config import DataConfig
from data.prepare import BatchSampler, Document, describe, load_documents, prepare, split_documents


@pytest.fixture
def code_folder(tmp_path, stdlib_docs):
    root = tmp_path / "corpus"
    for d in stdlib_docs[:60]:
        p = root / d.name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(d.text, encoding="utf-8")
    (root / "binary.py").write_bytes(b"\xff\xfe\x00 not utf-8 \x80\x81")
    return root


def test_default_corpus_is_the_stdlib_without_site_packages(stdlib_docs):
    names = {d.name for d in stdlib_docs}
    assert "os.py" in names and "json/__init__.py" in names
    assert not any("site-packages" in n for n in names)
    assert 20e6 < sum(len(d.text) for d in stdlib_docs) < 60e6


def test_prepare_writes_tokens_and_manifest_and_reuses_cache(tmp_path, code_folder, monkeypatch):
    cfg = DataConfig(corpus=str(code_folder), vocab_size=600, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg, progress=False)
    m = json.loads((data.dir / "manifest.json").read_text())
    assert m["corpus"]["docs"] == 60  # the non-UTF-8 file is skipped
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 60
    assert len(data.train) == m["splits"]["train"]["tokens"] and data.train.dtype == np.uint16
    assert data.vocab_size == 600 and int(data.train.max()) < 600
    # each document is <s> tokens </s>, so the decoded first document is the first train document's text
    eos = int(np.argmax(np.asarray(data.train) == data.tokenizer.eos_id))
    first = data.tokenizer.decode(data.train[1:eos])
    assert first in {d.text for d in load_documents(cfg)}
    # second call: nothing is recomputed
    monkeypatch.setattr(data_mod, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer retrained"))
    again = prepare(cfg, progress=False)
    assert again.dir == data.dir and np.array_equal(again.val, data.val)
    assert again.from_cache and not data.from_cache and "read the cache" in describe(again)
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_changed_settings_use_a_new_cache_entry(tmp_path, code_folder):
    a = prepare(DataConfig(corpus=str(code_folder), vocab_size=600, cache_dir=str(tmp_path)), progress=False)
    b = prepare(DataConfig(corpus=str(code_folder), vocab_size=700, cache_dir=str(tmp_path)), progress=False)
    assert a.dir != b.dir and b.vocab_size == 700


def test_split_is_deterministic_and_by_document():
    docs = [Document(f"doc{i}.py", f"text {i}") for i in range(1000)]
    train, val = split_documents(docs, 0.1)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    train2, val2 = split_documents(shuffled, 0.1)
    assert {d.name for d in val} == {d.name for d in val2}
    assert 60 < len(val) < 140 and len(train) + len(val) == 1000
    assert not {d.name for d in train} & {d.name for d in val}
    # adding documents does not move existing ones between splits
    _, val3 = split_documents(docs + [Document("new.py", "x")], 0.1)
    assert {d.name for d in val} <= {d.name for d in val3}


def test_tiny_corpus_still_has_both_splits():
    train, val = split_documents([Document("a", "x"), Document("b", "y")], 0.05)
    assert len(train) == 1 and len(val) == 1


def test_jsonl_corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i} " * 5, "id": i}) for i in range(30)) + "\n")
    docs = load_documents(DataConfig(corpus=str(path)))
    assert len(docs) == 30 and docs[3].text == "line 3 " * 5
    with pytest.raises(ValueError, match="no column 'body'.*--text-field"):
        load_documents(DataConfig(corpus=str(path), text_field="body"))


def _binary_folder(path):
    path.mkdir()
    (path / "x.py").write_bytes(b"\xff\xfe\x81")
    return str(path)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: str(p / "missing_dir/"), "does not exist"),
        (lambda p: (p / "e.txt").write_text("") or str(p / "e.txt"), "is empty"),
        (lambda p: (p / "d").mkdir() or str(p / "d"), "holds no UTF-8 text documents"),
        (lambda p: _binary_folder(p / "b"), "holds no UTF-8 text documents"),
        (lambda p: str(p / "c.md"), "does not exist"),
    ],
)
def test_bad_corpus_paths(tmp_path, setup, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_documents(DataConfig(corpus=setup(tmp_path)))


def test_batch_sampler_is_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    s = BatchSampler(tokens, seq_len=16, global_batch=8, seed=3)
    x, y = s.get(5)
    assert x.shape == (8, 16) and torch_equal(y[:, :-1], x[:, 1:]) and (y - x == 1).all()
    x2, _ = BatchSampler(tokens, 16, 8, seed=3).get(5)
    assert torch_equal(x, x2)
    assert not torch_equal(x, s.get(6)[0])
    # slices for ranks / micro-steps put back together are the global batch
    parts = [s.get(5, start=i, count=2)[0] for i in range(0, 8, 2)]
    assert torch_equal(x, np.concatenate([p.numpy() for p in parts]))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        BatchSampler(tokens[:10], 16, 8, 0)


def torch_equal(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_overrides_are_type_checked():
    cfg = apply_overrides(DataConfig(), ["--vocab-size", "1000", "--corpus=foo", "--val-fraction", "0.2"])
    assert (cfg.vocab_size, cfg.corpus, cfg.val_fraction) == (1000, "foo", 0.2)
    assert apply_overrides(DataConfig(), ["--corpus", "none"]).corpus is None
    with pytest.raises(ConfigError, match="unknown config key --vocab; did you mean --vocab-size"):
        apply_overrides(DataConfig(), ["--vocab", "10"])
    with pytest.raises(ConfigError, match="--vocab_size expects int, got 'big'"):
        apply_overrides(DataConfig(), ["--vocab_size", "big"])
    with pytest.raises(ValueError, match="between 0 and 1"):
        apply_overrides(DataConfig(), ["--val-fraction", "1.5"])


def test_python_sources_corpus_is_offline_deduplicated_and_recorded(tmp_path):
    from data.prepare import PYTHON_SOURCES, load_documents, prepare

    cfg = DataConfig(corpus=PYTHON_SOURCES, file_glob="**/json/*.py", vocab_size=400, cache_dir=str(tmp_path))
    docs = load_documents(cfg)
    roots = {d.name.split("/")[0] for d in docs}
    assert roots == {"stdlib", "site-packages"}, roots  # the standard library and installed packages
    assert len({d.text for d in docs}) == len(docs) and len({d.name for d in docs}) == len(docs)
    stdlib_only = load_documents(DataConfig(file_glob="**/json/*.py"))
    assert len(docs) > len(stdlib_only)
    data = prepare(cfg, progress=False)
    m = data.manifest
    assert m["corpus"]["source"] == PYTHON_SOURCES and m["corpus"]["docs"] == len(docs)
    assert "torch" in m["packages"] and m["splits"]["train"]["tokens"] > 0


def test_two_processes_preparing_the_same_corpus_do_it_once(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        (folder / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 30)
    code = (
        "from data.config import DataConfig; from data.prepare import prepare; "
        f"d = prepare(DataConfig(corpus={str(folder)!r}, vocab_size=300, cache_dir={str(tmp_path / 'cache')!r}), "
        "progress=False); print('cached' if getattr(d, 'from_cache', False) else 'prepared')"
    )
    repo = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    said = sorted(p.communicate()[0].strip() for p in procs)
    assert said == ["cached", "prepared"]  # one trained the tokenizer, the other waited and read its cache
