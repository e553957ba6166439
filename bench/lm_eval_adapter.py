"""The lm-eval adapter (``eval.lm_eval_model.ProjectLM``) against lm-eval's own HF model (HFLM), side by side.

    python -m bench.lm_eval_adapter                 # 100 rolling documents, 200 four-way items, batch 8
    python -m bench.lm_eval_adapter --rounds 5 --docs 50 --items 100

One random-weight plain Llama (this project's ``Transformer``, dim 256, 4 blocks, context 512) with a
SentencePiece tokenizer trained here on standard-library sources, exported to a Hugging Face folder
(``llama.convert export``). Two local tasks over standard-library text: a rolling loglikelihood over whole
documents (word/byte perplexity, bits per byte) and a four-way multiple choice (the true next line of code
against three lines drawn from elsewhere). Each round runs ``lm_eval.simple_evaluate`` on both tasks once with
``--model hf`` on the folder and once with the adapter on the same folder (the order alternates), in one
process; the first round is the warm-up. Reported: each one's wall time, the ratio adapter / HFLM per round
(Hodges-Lehmann with its Wilcoxon interval, common.stats.paired_ratio), and every metric of both, which must
agree (else the timing is void). Target: ratio at most 0.8. Writes bench/results/lm_eval_adapter.json.
"""

from __future__ import annotations

import json
import random
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cli import UserError, parse_args, run_main
from common.files import atomic_write
from common.hardware import run_metadata
from common.stats import paired_ratio
from common.timing import spread
from data.config import DataConfig
from data.prepare import iter_documents

TARGET = 0.8  # adapter / HFLM wall time, at most


def corpus(n_docs: int, n_items: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(rolling documents, four-way items) from the standard library's sources: documents cut to 3,000
    characters; an item's question is 6 lines of a file, its answer the next line, its distractors lines of
    other files."""
    docs = [d.text for d in iter_documents(DataConfig()) if len(d.text) > 500]
    rng = random.Random(seed)
    rng.shuffle(docs)
    rolling = [{"text": d[:3000]} for d in docs[:n_docs]]
    lines = [ln for d in docs[n_docs:] for ln in d.splitlines() if len(ln.strip()) > 8]
    items = []
    for d in docs[n_docs:]:
        ls = [ln for ln in d.splitlines() if ln.strip()]
        if len(ls) < 8 or len(items) >= n_items:
            continue
        k = rng.randrange(0, len(ls) - 7)
        choices = [ls[k + 6], *rng.sample(lines, 3)]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"question": "\n".join(ls[k : k + 6]) + "\n", "choices": [choices[i] for i in order],
                      "answer": order.index(0)})  # fmt: skip
    if len(items) < n_items:
        raise UserError(f"only {len(items)} items could be made from the standard library; ask for fewer")
    return rolling, items


def write_tasks(folder: Path, rolling: list[dict], items: list[dict]) -> Path:
    """Two local lm-eval tasks, bench_rolling and bench_mc, reading local JSONL files."""
    specs = {
        "rolling": (rolling, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                    "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                    "  - metric: bits_per_byte\n"),
        "mc": (items, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
               'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'),
    }  # fmt: skip
    for name, (rows, spec) in specs.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        head = f"task: bench_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        (folder / f"bench_{name}.yaml").write_text(head + "test_split: test\n" + textwrap.dedent(spec))
    return folder


def model_folder(work: Path, a) -> Path:
    """A random-weight plain Llama with a tokenizer trained here, exported as a Hugging Face folder."""
    from llama.convert import export_hf
    from llama.model import ModelArgs, Transformer
    from llama.tokenizer import train_tokenizer

    texts = [d.text for _, d in zip(range(300), iter_documents(DataConfig()), strict=False)]
    tok = train_tokenizer(texts, work / "tokenizer.model", a.vocab_size)
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=4, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=512)
    return export_hf(Transformer(args).eval(), work / "hf", tok.path)


def metrics_of(result: dict) -> dict:
    return {
        task: {k: v for k, v in values.items() if isinstance(v, float) and "stderr" not in k}
        for task, values in result["results"].items()
    }


def run(a) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from eval.lm_eval_model import ProjectLM

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench-lm-eval-") as d:
        work = Path(d)
        folder = model_folder(work, a)
        (work / "tasks").mkdir()
        tasks = write_tasks(work / "tasks", *corpus(a.docs, a.items))
        manager = TaskManager(include_path=str(tasks))
        models = {
            "hflm": lambda: HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=a.batch_size),
            "adapter": lambda: ProjectLM(str(folder), device="cpu", dtype="float32", batch_size=a.batch_size),
        }
        names = ["bench_rolling", "bench_mc"]
        times = {k: [] for k in models}
        results = {}
        for r in range(a.rounds + 1):  # round 0: warm-up, not counted
            for name in list(models)[r % 2 :] + list(models)[: r % 2]:
                t0 = time.perf_counter()
                out = simple_evaluate(model=models[name](), tasks=names, task_manager=manager, verbosity="ERROR")
                dt = time.perf_counter() - t0
                if r > 0:
                    times[name].append(dt)
                results[name] = metrics_of(out)
    differ = {
        task: {k: (v, results["adapter"][task].get(k)) for k, v in m.items()
               if abs(v - results["adapter"][task].get(k, float("nan"))) > 1e-6 * max(1.0, abs(v))}
        for task, m in results["hflm"].items()
    }  # fmt: skip
    if any(differ.values()):
        raise UserError(f"the adapter's metrics differ from HFLM's: {differ}; the timing is void")
    ratio = paired_ratio(times["adapter"], times["hflm"])
    return {
        **run_metadata(torch.device("cpu")),
        "setup": {
            "docs": a.docs,
            "items": a.items,
            "batch_size": a.batch_size,
            "rounds": a.rounds,
            "threads": a.threads,
            "model": "plain Llama dim 256, 4 blocks, context 512",
            "vocab_size": a.vocab_size,
        },  # fmt: skip
        "seconds": {k: spread(v) | {"samples": v} for k, v in times.items()},
        "ratio_adapter_to_hflm": ratio,
        "target": f"at most {TARGET}",
        "metrics": results,
    }


@dataclass
class Args:
    docs: int = 100  # rolling-loglikelihood documents
    items: int = 200  # four-way multiple-choice items
    batch_size: int = 8
    rounds: int = 7  # timed rounds after one warm-up round
    threads: int = 2  # torch threads (both models alike)
    vocab_size: int = 2000
    out: str = "bench/results/lm_eval_adapter.json"


def main(argv=None):
    a = parse_args(Args(), argv)
    r = run(a)
    atomic_write(a.out, json.dumps(r, indent=2))
    q = r["ratio_adapter_to_hflm"]
    for k, s in r["seconds"].items():
        print(f"{k}: {s['median']:.2f} s per round (p10-p90 {s['p10']:.2f}-{s['p90']:.2f})")
    interval = (
        f"[{q['ci_low']:.3f}, {q['ci_high']:.3f}] (p = {q['p']:.3g})"
        if "ci_low" in q
        else f"(no interval: {q['reason']})"
    )
    print(f"adapter / HFLM: x{q['median']:.3f} {interval}, target <= {TARGET}")
    print(f"metrics equal: {json.dumps(r['metrics']['adapter'])}")
    print(f"-> {a.out}")


if __name__ == "__main__":
    run_main(main)
