"""In-context repetition (induction, Olsson et al., 2022): sequences repeated once; the loss on the second copy
against the loss on the first.

    python -m eval.induction checkpoints/tiny
    python -m eval.induction checkpoints/tiny --sequences 128 --length 100

Two kinds of sequence, each its own figure:
- ``random``: tokens drawn uniformly from the vocabulary (Olsson et al.'s probe). A random token cannot be
  predicted from what came before it in the first copy; in the second copy each token is the one that followed
  the same token in the first copy, which an induction head (a previous-token head in one layer read by a head of
  a later layer: K-composition) finds. A model that only learned to favour tokens it has seen gets the second
  copy down to about log(length) at best; below that it knows which seen token comes next.
- ``heldout``: spans of the model's held-out text, repeated: copying where the text is the kind it was trained
  on (a model that has no induction head may still copy some of it).
``induction_nats`` = first - second, in nats per token, per sequence with a 95% t-interval over sequences: 0 for
a model that does not use the first copy. Writes results/<model>-induction.json.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import UserError, parse_args, ranged, run_main
from common.stats import mean_ci
from eval.model import EvalOptions


def random_repeats(ordinary: np.ndarray, n: int, length: int, bos: int, seed: int) -> torch.Tensor:
    """(n, 2 length + 1) sequences: <s>, ``length`` tokens drawn uniformly from ``ordinary`` (with replacement),
    the same tokens again."""
    rng = np.random.default_rng(seed)
    halves = ordinary[rng.integers(0, len(ordinary), size=(n, length))]
    return torch.as_tensor(np.concatenate([np.full((n, 1), bos), halves, halves], axis=1), dtype=torch.long)


@torch.no_grad()
def induction_losses(model, sequences: torch.Tensor, batch_size: int = 16, autocast=None) -> dict:
    """Per sequence, the mean NLL (nats) of tokens 2..L of the first copy and of the same positions of the second
    (the first token of a copy is left out of both: nothing before it predicts it in either), from one forward
    pass over each whole sequence."""
    n, total = sequences.shape
    length = (total - 1) // 2
    device = next(model.parameters()).device
    first, second = [], []
    for i in range(0, n, batch_size):
        x = sequences[i : i + batch_size].to(device)
        with autocast or nullcontext():
            logits = model(x[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none").double()  # (B, T - 1)
        # target position p (1-based in the sequence) is column p - 1; copy one holds 1..L, copy two L+1..2L
        first += nll[:, 1:length].mean(1).tolist()  # positions 2..L
        second += nll[:, length + 1 : 2 * length].mean(1).tolist()  # positions L+2..2L
    return {"first": first, "second": second}


def summarize(first: list[float], second: list[float], vocab: int) -> dict:
    diffs = [a - b for a, b in zip(first, second, strict=True)]
    return {
        "loss_first": float(np.mean(first)),
        "loss_second": float(np.mean(second)),
        "induction_nats": mean_ci(diffs),  # over sequences: mean with its 95% t-interval
        "uniform_nats": math.log(vocab),  # a model that knows nothing: both losses
    }


def ordinary_tokens(tokenizer) -> np.ndarray:
    """Ids that stand for text (one or more bytes): not <s>, </s>, <unk> or padding."""
    ids = np.flatnonzero(tokenizer.token_bytes() > 0)
    return ids[(ids != tokenizer.bos_id) & (ids != (tokenizer.eos_id if tokenizer.eos_id is not None else -1))]


@dataclass
class Args(EvalOptions):
    EVALUATORS = ("induction",)
    sequences: int = ranged(64, 1)  # random sequences, each repeated once
    length: int = ranged(100, 1)  # tokens per copy (the sequence is 2 length + 1 tokens, at most the model's context)
    seed: int = 0  # which random tokens: the same for every model of one vocabulary
    batch_size: int = ranged(16, 1)  # sequences per forward pass


def heldout_repeats(ev, n: int, length: int, seed: int) -> torch.Tensor | None:
    """(n, 2 length + 1): <s>, a span of ``length`` tokens at a random place of a random held-out document (one
    longer than the span), the same span again; None where the model's folder names no training data (a Hugging
    Face model)."""
    from data.heldout import model_data
    from data.prepare import heldout_documents

    try:
        data = model_data(ev.folder)
    except FileNotFoundError:
        return None
    docs = [d for d in heldout_documents(data.val, ev.tokenizer) if len(d) > length]
    if not docs:
        raise UserError(f"no held-out document of {ev.folder} is longer than --length {length}; give a smaller one")
    rng = np.random.default_rng(seed)
    spans = []
    for _ in range(n):
        doc = docs[rng.integers(len(docs))]
        start = rng.integers(0, len(doc) - length + 1)
        spans.append(np.asarray(doc[start : start + length], dtype=np.int64))
    halves = np.stack(spans)
    return torch.as_tensor(np.concatenate([np.full((n, 1), ev.tokenizer.bos_id), halves, halves], axis=1))


def evaluate_induction(ev, sequences: int, length: int, seed: int, batch_size: int) -> dict:
    context = ev.model.params.max_seq_len
    if sequences < 2 or length < 3:
        raise UserError(f"--sequences {sequences} --length {length}: give 2+ sequences of 3+ tokens")
    if 2 * length + 1 > context:
        raise UserError(f"--length {length}: 2 x {length} + 1 tokens exceed the model's context of {context}")
    ordinary = ordinary_tokens(ev.tokenizer)
    t0 = time.perf_counter()
    out = {"sequences": sequences, "length": length, "seed": seed, "tokens_drawn_from": int(len(ordinary))}
    kinds = {
        "random": random_repeats(ordinary, sequences, length, ev.tokenizer.bos_id, seed),
        "heldout": heldout_repeats(ev, sequences, length, seed),
    }
    for kind, seqs in kinds.items():
        if seqs is None:
            out[kind] = None  # not measured: the model has no held-out split of its own
            continue
        r = induction_losses(ev.model, seqs, ev.batch_size(batch_size), ev.autocast())
        out[kind] = {**summarize(r["first"], r["second"], len(ordinary)), "per_sequence": r}
    return out | {"dtype": str(ev.dtype).removeprefix("torch."), "time_s": time.perf_counter() - t0}


def main(argv=None):
    a = parse_args(Args(), argv)
    ev = a.load()
    r = evaluate_induction(ev, a.sequences, a.length, a.seed, a.batch_size)
    out = ev.write("induction", r, a)
    for kind in ("random", "heldout"):
        k = r[kind]
        if k is None:
            print(f"{ev.name}, {kind}: not measured (no held-out split of its own)")
            continue
        ci = k["induction_nats"]
        print(
            f"{ev.name}, {kind} tokens: loss on the first copy {k['loss_first']:.3f}, on the second "
            f"{k['loss_second']:.3f} nats/token; induction {ci['mean']:.3f} nats [{ci['ci_low']:.3f}, "
            f"{ci['ci_high']:.3f}] (95%, {a.sequences} sequences of {a.length})"
        )
    print(f"-> {out}")


if __name__ == "__main__":
    run_main(main)
