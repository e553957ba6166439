import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.perplexity import sliding_window_nll, summarize, windows
from llama.model import Transformer


@pytest.mark.parametrize("n, context, stride", [(100, 16, 8), (100, 16, 15), (17, 16, 4), (5, 16, 3), (64, 16, 1)])
def test_windows_score_each_target_once(n, context, stride):
    scored = []
    for begin, end, first in windows(n, context, stride):
        assert end - begin <= context and begin < first <= end
        # each scored target sees at least context - stride tokens of history (or all there is)
        assert all(p - begin >= min(p, context - stride) for p in range(first, end))
        scored += range(first, end)
    assert scored == list(range(1, n))  # every target but the first token, each once


@pytest.mark.parametrize("stride", [16, 17, 0])
def test_a_stride_that_leaves_tokens_unscored_is_rejected(stride):
    # stride = context would skip the first token of every window after the first
    with pytest.raises(ValueError, match="stride"):
        windows(100, 16, stride)


def test_stride_of_context_minus_one_is_the_chunked_loss_with_every_token_scored(tiny_args):
    model = Transformer(tiny_args).eval()
    tokens = torch.randint(0, 97, (200,))
    r = sliding_window_nll(model, tokens, context=32, stride=31, batch_size=3)
    total = 0.0
    with torch.no_grad():
        for b in range(0, 199, 31):  # chunks overlapping by one token: each chunk's first token is a target
            chunk = tokens[b : b + 32]
            logits = model(chunk[None, :-1])[0]
            total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
    assert r["tokens_scored"] == 199
    assert r["nll_sum"] == pytest.approx(total, rel=1e-5)


def test_shorter_stride_scores_every_token_and_batching_does_not_matter(tiny_args):
    model = Transformer(tiny_args).eval()
    tokens = torch.randint(0, 97, (150,))
    a = sliding_window_nll(model, tokens, context=32, stride=8, batch_size=1)
    b = sliding_window_nll(model, tokens, context=32, stride=8, batch_size=16)
    assert a["tokens_scored"] == b["tokens_scored"] == 149
    assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-5)


class Memorizer(torch.nn.Module):
    """Knows the sequence: puts a logit of 30 on (token + 1) mod V. Any misalignment costs ~30 nats."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.one_hot((x + 1) % self.vocab, self.vocab).float() * 30.0


@pytest.mark.parametrize("stride", [1, 5, 15])
def test_perfect_memorisation_has_near_zero_loss(stride):
    tokens = np.arange(300) % 50
    r = summarize(sliding_window_nll(Memorizer(50), tokens, context=16, stride=stride, batch_size=4))
    assert r["loss"] < 1e-9 and r["perplexity"] == pytest.approx(1.0)


def test_bits_per_byte_by_hand():
    # 4 tokens scored with a total NLL of 8 ln 2 nats = 8 bits, over 4 bytes of text: 2 bits per byte,
    # 2 bits (= 2 ln 2 nats) per token, perplexity e^(2 ln 2) = 4.
    r = summarize({"nll_sum": 8 * math.log(2), "tokens_scored": 4, "bytes_scored": 4})
    assert r["bits_per_byte"] == pytest.approx(2.0) and r["perplexity"] == pytest.approx(4.0)
    # the byte count comes from the scored targets only: a table of 3 bytes per token, 10 tokens, stride<context
    table = np.full(50, 3)
    r = sliding_window_nll(Memorizer(50), np.arange(10), context=4, stride=2, token_bytes=table)
    assert r["bytes_scored"] == 9 * 3


@pytest.mark.parametrize("n, max_len", [(1, 4), (4, 4), (5, 4), (13, 4), (9, 1), (30, 7)])
def test_rolling_windows_score_every_token_once_as_lm_eval(n, max_len):
    from eval.perplexity import rolling_windows

    scored = []
    for i, (begin, end, first) in enumerate(rolling_windows(n, max_len)):
        assert end - 1 - begin <= max_len  # at most max_len inputs
        if i == 0:
            assert begin == 0 and first == 1  # the first token is predicted from the prefix alone
        else:
            assert end - 1 - begin == max_len  # later windows carry a full context
        scored += range(first, end)
    assert scored == list(range(1, n + 1))


def test_lm_eval_mode_metrics_by_hand():
    import re

    from eval.perplexity import document_nll, lm_eval_metrics

    # the memorizer knows every next token (logit 30, nearly zero loss), and the prefix predicts token 0 too
    docs = [np.arange(0, 11) % 50, np.arange(0, 3) % 50]
    prefix = 49  # (49 + 1) % 50 = 0: the first token of each document is predicted correctly
    nll = document_nll(Memorizer(50), docs, prefix, max_len=4)
    assert all(x < 1e-9 for x in nll)
    texts = ["a b  c\nd", "éé"]
    r = lm_eval_metrics([math.log(2) * 8, math.log(2) * 4], texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)  # 4 + 1, as lm-eval counts them
    assert r["words"] == words == 5 and r["bytes"] == 8 + 4
    assert r["bits_per_byte"] == pytest.approx(1.0) and r["word_perplexity"] == pytest.approx(2 ** (12 / 5))
    assert r["mode"] == "lm-eval"


def test_lm_eval_mode_equals_a_direct_computation(tiny_args):
    from eval.perplexity import document_nll

    model = Transformer(tiny_args).eval()
    doc = torch.randint(3, 97, (40,))
    got = document_nll(model, [doc.numpy()], 1, max_len=16)[0]
    # by hand: [prefix + doc[:15]] predicts doc[:16]; then doc[k-16:k] predicts the next 16 (and the last 8)
    stream = torch.cat([torch.tensor([1]), doc])
    want = 0.0
    with torch.no_grad():
        for begin, end, first in [(0, 17, 1), (16, 33, 17), (24, 41, 33)]:
            logits = model(stream[begin : end - 1][None])[0]
            nll = F.cross_entropy(logits, stream[begin + 1 : end], reduction="none")
            want += nll[first - begin - 1 :].sum().item()
    assert got == pytest.approx(want, rel=1e-5)


def test_both_modes_from_the_command_name_themselves(trained_checkpoint, tmp_path):
    import json

    from eval.perplexity import main

    main([str(trained_checkpoint), "--mode", "lm-eval", "--max-tokens", "3000", "--out", str(tmp_path / "l.json")])
    main([str(trained_checkpoint), "--max-tokens", "3000", "--out", str(tmp_path / "s.json")])
    lm, sliding = json.loads((tmp_path / "l.json").read_text()), json.loads((tmp_path / "s.json").read_text())
    assert lm["mode"] == "lm-eval" and sliding["mode"] == "sliding"
    assert lm["word_perplexity"] > lm["byte_perplexity"] > 1 and lm["documents"] >= 1
    assert lm["bits_per_byte"] == pytest.approx(math.log2(lm["byte_perplexity"]))
    assert "word_perplexity" not in sliding and sliding["perplexity"] > 1


@pytest.mark.parametrize("mode", ["sliding", "lm-eval"])
def test_a_token_budget_reads_and_tokenizes_only_what_it_needs_of_a_large_corpus(tmp_path, mode):
    # The README's Hugging Face example once tokenized the whole corpus before --max-tokens applied (24 GB).
    import tracemalloc

    from data.config import DataConfig
    from eval.model import load_for_eval
    from eval.perplexity import evaluate_perplexity
    from tests.hf_models import make_hf_model

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "def f(x):\n    return [x * i for i in range(10)]  # a line of code\n" * 500  # 33 kB a file
    for i in range(3000):  # about 100 MB in all
        (corpus / f"m{i:05d}.py").write_text(text)
    ev = load_for_eval(make_hf_model("gpt_neox", tmp_path / "hf"), "cpu")
    seen = []
    encode_batch = ev.tokenizer.encode_batch
    ev.tokenizer.encode_batch = lambda texts, *a, **k: seen.append(len(texts)) or encode_batch(texts, *a, **k)
    tracemalloc.start()
    r = evaluate_perplexity(ev, DataConfig(corpus=str(corpus)), None, None, 8, 5000, progress=False, mode=mode)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(seen) <= 64 and peak < 40e6, (sum(seen), peak)  # one batch of documents, not 3000 (100 MB)
    assert 0 < r["tokens_scored"] <= 5000 or r["documents"] == 1  # lm-eval mode scores whole documents, one at least


def test_a_token_budget_scores_whole_documents_drawn_across_the_split():
    from eval.perplexity import sample_documents

    sizes = [100] * 80
    chosen, said = sample_documents(sizes, 1000)
    assert len(chosen) == 10 and chosen == sorted(chosen) and sum(sizes[i] for i in chosen) <= 1000
    assert min(chosen) < 40 <= max(chosen)  # from across the split, not its first ten documents
    assert chosen == sample_documents(sizes, 1000)[0]  # the same for every model
    assert said.startswith("10 of 80 whole documents (1,000 of 8,000 tokens), drawn at random (seed 0)")
    assert sample_documents(sizes, None)[0] == list(range(80)) and sample_documents([5000], 10)[0] == [0]


def test_the_held_out_sample_is_stated_in_the_result(trained_checkpoint):
    from eval.model import load_for_eval
    from eval.perplexity import evaluate_perplexity

    ev = load_for_eval(str(trained_checkpoint), "cpu")
    for mode in ("sliding", "lm-eval"):
        r = evaluate_perplexity(ev, None, None, None, 4, 3000, progress=False, mode=mode)
        assert "whole documents" in r["sample"] and "drawn at random" in r["sample"], r["sample"]
        assert r["tokens_scored"] <= 3000
