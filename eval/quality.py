"""All quality evaluators on one checkpoint: perplexity, text metrics, HumanEval pass@k.

    python -m eval.quality checkpoints/tiny
    python -m eval.quality checkpoints/baseline_8_layer --humaneval-samples 20 --temperature 0.8 --k 1 10

Writes results/<model>-quality.json and prints a short table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import parse_args, positional, run_main
from eval.common import write_result
from eval.generate import complete, prompts_truncated
from eval.humaneval import STOP_STRINGS, load_problems, score_completions, trim_completion
from eval.model import load_for_eval
from eval.perplexity import CorpusArgs, evaluate_perplexity
from eval.text_metrics import continuation_task, score_texts


def humaneval_task(ev, limit, n_samples, temperature, top_p, ks, max_new_tokens, batch_size, timeout_s, memory_mb):
    problems = load_problems(limit)
    prompts = [p["prompt"] for p in problems]
    texts = complete(ev, prompts, max_new_tokens, temperature, top_p, STOP_STRINGS, batch_size, n_samples)
    completions = [[trim_completion(t) for t in ts] for ts in texts]
    executed = score_completions(problems, completions, ks, timeout_s, memory_mb)
    text = score_texts([c[0] for c in completions], [p["canonical_solution"] for p in problems])
    return {
        "pass": executed,
        "text_metrics": text,
        "n_samples": n_samples,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "prompts_truncated": prompts_truncated(ev, prompts, max_new_tokens),
        "examples": [
            {"task_id": p["task_id"], "completion": c[0]} for p, c in zip(problems[:3], completions[:3], strict=True)
        ],
    }


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
class Args:
    checkpoint: str = positional()  # a checkpoints/<run> folder (its newest step) or a model folder
    text: CorpusArgs = field(default_factory=CorpusArgs)
    stride: int | None = None  # perplexity stride (default: context / 2)
    max_tokens: int | None = None  # perplexity on the first N tokens only
    n_docs: int = 50  # held-out documents for continuations
    prompt_tokens: int = 128  # continuation prompt length
    continuation_tokens: int = 64  # continuation reference length
    humaneval_limit: int | None = None  # first N of the 164 problems
    humaneval_samples: int = 1  # completions per problem
    temperature: float = 0.0  # HumanEval sampling; 0 = greedy
    top_p: float = 0.95  # nucleus sampling for HumanEval (with temperature > 0)
    k: list[int] = field(default_factory=lambda: [1])  # pass@k for these k
    max_new_tokens: int = 128  # HumanEval completion length
    batch_size: int = 8  # sequences per forward pass
    timeout: float = 5.0  # seconds per HumanEval program
    memory_mb: int = 1024  # address space per HumanEval program
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA), bfloat16, float32
    out: str | None = None  # default: results/<model>-quality.json


def main(argv=None):
    a = parse_args(Args(), argv)
    t0 = time.perf_counter()
    ev = load_for_eval(a.checkpoint, a.device, a.dtype)
    result = {
        "evaluator": "quality",
        "model": ev.name,
        "checkpoint": str(ev.folder),
        "params": ev.n_params,
        "n_layers": ev.model.params.n_layers,
        "per_head": ev.model.params.head_layer is not None,
        "compression": ev.compression,
        "perplexity": evaluate_perplexity(ev, a.text.data_config(), None, a.stride, a.batch_size, a.max_tokens),
        "continuation": continuation_task(ev, a.n_docs, a.prompt_tokens, a.continuation_tokens, a.batch_size),
        "humaneval": humaneval_task(
            ev,
            a.humaneval_limit,
            a.humaneval_samples,
            a.temperature,
            a.top_p,
            a.k,
            a.max_new_tokens,
            a.batch_size,
            a.timeout,
            a.memory_mb,
        ),
    }
    result["time_s"] = time.perf_counter() - t0
    out = write_result(a.out or Path("results") / f"{ev.name}-quality.json", result, ev.device)
    print(table(result))
    print(f"-> {out} ({result['time_s']:.0f} s)")


if __name__ == "__main__":
    run_main(main)
