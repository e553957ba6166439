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
