"""The induction probe (eval.induction): its losses equal a hand computation on models whose predictions are known,
a 2-layer model trained where only induction lowers the loss uses the first copy far more than a 1-layer one, and
the command writes a typed result for this project's models and Hugging Face folders alike."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from common.results import InductionResult, read_typed
from eval.induction import induction_losses, main, random_repeats
from llama.model import ModelArgs, Transformer


class Copier(nn.Module):
    """Logits by hand: 0 everywhere (uniform) except, from the second copy on, ``gain`` on the token that followed
    the current token in the first copy (a perfect induction head)."""

    def __init__(self, vocab: int, length: int, gain: float):
        super().__init__()
        self.vocab, self.length, self.gain = vocab, length, gain
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        for t in range(self.length + 1, x.shape[1]):  # input position t holds copy two's token t - length
            logits[:, t, :].scatter_(1, x[:, t - self.length + 1 : t - self.length + 2], self.gain)
        return logits


def test_losses_equal_a_hand_computation():
    vocab, length = 50, 8
    seqs = random_repeats(np.arange(vocab), 5, length, bos=0, seed=3)
    assert seqs.shape == (5, 17) and torch.equal(seqs[:, 1:9], seqs[:, 9:])
    r = induction_losses(Copier(vocab, length, gain=4.0), seqs, batch_size=2)
    # first copy: uniform logits, -log(1/50) for every token; second: softmax of a gain of 4 on the right token
    assert r["first"] == pytest.approx([math.log(vocab)] * 5, abs=1e-6)
    assert r["second"] == pytest.approx([math.log(vocab - 1 + math.exp(4.0)) - 4.0] * 5, abs=1e-6)
    uniform = induction_losses(Copier(vocab, length, gain=0.0), seqs)
    assert uniform["first"] == pytest.approx(uniform["second"])  # a model that does not copy: no difference


def test_the_copy_is_scored_at_the_positions_it_can_be_predicted(tiny_args):
    """A model that gets the second copy right everywhere but at one position: only in-copy positions 2..L count,
    so the copy's first token (unpredictable from what came before) is left out of both copies."""
    vocab, length = 30, 6
    seqs = random_repeats(np.arange(vocab), 3, length, bos=0, seed=0)
    copier = Copier(vocab, length, gain=50.0)
    r = induction_losses(copier, seqs)
    assert max(r["second"]) < 1e-6  # positions L+2..2L: all copied exactly


def train_on_repeats(n_layers: int, steps: int = 2000) -> nn.Module:
    """A model trained on sequences whose second half repeats a random first half of random length (so no fixed
    offset finds the copy: only content does)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vocab, total = 32, 33
    args = ModelArgs(dim=32, n_layers=n_layers, n_heads=2, vocab_size=vocab, multiple_of=32, max_seq_len=64)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        rows = []
        for _ in range(32):
            half = rng.integers(2, vocab, rng.integers(4, 13))
            rows.append(np.concatenate([[0], half, half, rng.integers(2, vocab, total - 1 - 2 * len(half))]))
        x = torch.as_tensor(np.stack(rows))
        loss = nn.functional.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_a_two_layer_model_copies_from_context_and_a_one_layer_model_much_less():
    """The answer known from Olsson et al. (2022): induction needs a head of one layer to read a head of an earlier
    one. Both models learn to favour tokens already seen (second copy near log(length), 2.3 nats here); only the
    2-layer one learns which seen token comes next."""
    seqs = random_repeats(np.arange(2, 32), 64, 10, bos=0, seed=1)
    two = induction_losses(train_on_repeats(2), seqs)
    one = induction_losses(train_on_repeats(1), seqs)
    gain = {k: np.mean(r["first"]) - np.mean(r["second"]) for k, r in (("two", two), ("one", one))}
    assert gain["two"] > gain["one"] + 0.5
    assert np.mean(two["second"]) < math.log(10) - 0.5 < np.mean(one["second"])


def test_the_command_writes_a_typed_result(trained_checkpoint, tmp_path, hf_models):
    out = tmp_path / "ind.json"
    main([str(trained_checkpoint), "--sequences", "4", "--length", "10", "--out", str(out)])
    r = read_typed(out)
    assert isinstance(r, InductionResult) and r.sequences == 4 and r.length == 10
    assert r.random is not None and r.heldout is not None  # this project's model: its own held-out text too
    record = json.loads(out.read_text())
    assert len(record["random"]["per_sequence"]["first"]) == 4
    # a Hugging Face folder has no held-out split of its own: that kind is "not measured", never a guess
    hf_out = tmp_path / "hf.json"
    main([str(hf_models["llama"]), "--sequences", "3", "--length", "8", "--out", str(hf_out)])
    hf = read_typed(hf_out)
    assert hf.random is not None and hf.heldout is None
    with pytest.raises(ValueError, match="exceed the model's context"):
        main([str(trained_checkpoint), "--length", "40", "--out", str(tmp_path / "x.json")])


def test_a_damaged_induction_result_is_refused(trained_checkpoint, tmp_path):
    out = tmp_path / "ind.json"
    main([str(trained_checkpoint), "--sequences", "3", "--length", "5", "--out", str(out)])
    record = json.loads(out.read_text())
    for field, value in (("loss_first", float("nan")), ("loss_second", -1.0), ("loss_first", "abc")):
        bad = json.loads(json.dumps(record))
        bad["random"][field] = value
        out.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"random.{field}"):
            read_typed(out)
