"""Pieces of the small study files the study tests write: seconds-long tiny runs and evaluations."""

from __future__ import annotations

# eval.quality at toy sizes: 300 held-out tokens, 2 continuation pairs, 1 HumanEval problem
QUALITY = ["--max-tokens", "300", "--n-docs", "2", "--prompt-tokens", "8", "--continuation-tokens", "4"]
QUALITY += ["--humaneval-limit", "1", "--max-new-tokens", "4"]


def tiny_run(corpus, interval: int = 2) -> list[str]:
    """runners.tiny options for a 4-step run of a dim-32 model on the test corpus, checkpointed every
    ``interval`` steps."""
    folder, cache = corpus
    model = ["--dim", "32", "--n-heads", "4", "--multiple-of", "16", "--max-seq-len", "32", "--seq-len", "32"]
    data = ["--corpus", str(folder), "--cache-dir", str(cache), "--vocab-size", "500", "--device", "cpu"]
    steps = ["--max-steps", "4", "--batch-size", "2", "--eval-interval", str(interval)]
    return [*model, *data, *steps, "--ckpt-interval", str(interval), "--eval-iters", "1"]


def q(args) -> str:
    """A TOML list of strings."""
    return "[" + ", ".join(f'"{a}"' for a in args) + "]"
