"""Token-level NLL, perplexity and bits-per-byte with a sliding window.

    python -m eval.perplexity checkpoints/tiny                              # the run's held-out split
    python -m eval.perplexity checkpoints/tiny --corpus notes/ --file-glob '**/*.md'
    python -m eval.perplexity checkpoints/run --corpus wikitext --hf-config wikitext-2-raw-v1 --hf-split test

Windows of ``context`` tokens start every ``stride`` tokens; each scores only the tokens no earlier window
scored, so with stride < context every token (but the first) is predicted from at least context - stride
tokens of history (stride must be below context, else the first token of every later window would go
unscored). Bits-per-byte divides the summed NLL by the UTF-8 bytes of the scored tokens, which
compares models with different tokenizers.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import parse_args, run_main
from eval.common import training_data
from eval.model import EvalOptions
from training.config import DataConfig
from training.data import load_documents


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) of each window over a stream of ``n_tokens`` tokens."""
    if not 0 < stride < context:
        # stride = context would leave the first token of every later window unscored (no history in it)
        raise ValueError(f"stride={stride} must be in 1..context-1={context - 1}; use --stride {context - 1} at most")
    out, prev_end = [], 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)  # target positions first..end-1 are new
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def sliding_window_nll(
    model,
    tokens: np.ndarray | torch.Tensor,
    context: int,
    stride: int,
    batch_size: int = 8,
    token_bytes: np.ndarray | None = None,
    autocast=None,
    progress: bool = False,
) -> dict:
    """Summed NLL (nats) over the scored targets, their count and, given ``token_bytes``, their bytes."""
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    device = next(model.parameters()).device
    wins = windows(len(tokens), context, stride)
    # windows of equal length go through the model together; only the last one can be shorter
    groups: dict[int, list] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    nll_sum, n_scored, n_bytes = 0.0, 0, 0
    bar = tqdm(total=len(wins), desc="perplexity", unit="window", disable=not progress)
    for ws in groups.values():
        for i in range(0, len(ws), batch_size):
            batch = ws[i : i + batch_size]
            rows = torch.stack([tokens[b:e] for b, e, _ in batch]).to(device)
            x, y = rows[:, :-1], rows[:, 1:]
            with autocast or nullcontext():
                logits = model(x)
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(len(batch), -1)
            for row, (b, e, first) in enumerate(batch):
                scored = nll[row, first - b - 1 :]  # target position p sits at column p - b - 1
                nll_sum += scored.double().sum().item()
                n_scored += scored.numel()
                if token_bytes is not None:
                    n_bytes += int(token_bytes[tokens[first:e].numpy()].sum())
            bar.update(len(batch))
    bar.close()
    return {"nll_sum": nll_sum, "tokens_scored": n_scored, "bytes_scored": n_bytes if token_bytes is not None else None}


def summarize(r: dict) -> dict:
    loss = r["nll_sum"] / r["tokens_scored"]
    out = {**r, "loss": loss, "perplexity": math.exp(loss)}
    # bits per byte: nats -> bits, per UTF-8 byte of the scored text (Gao et al., 2020, The Pile)
    out["bits_per_byte"] = r["nll_sum"] / math.log(2) / r["bytes_scored"] if r.get("bytes_scored") else None
    return out


def corpus_tokens(cfg: DataConfig, tokenizer) -> np.ndarray:
    docs = load_documents(cfg)
    ids = tokenizer.encode_batch([d.text for d in docs], bos=True, eos=True)
    return np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])


def evaluate_perplexity(
    ev,
    corpus: DataConfig | None,
    context: int | None,
    stride: int | None,
    batch_size: int,
    max_tokens: int | None,
    progress: bool = True,
) -> dict:
    context = context or ev.model.params.max_seq_len
    stride = stride or context // 2
    if corpus is None:
        data, _ = training_data(ev.folder)
        tokens, source = data.val, f"held-out split of {data.dir}"
    else:
        tokens, source = corpus_tokens(corpus, ev.tokenizer), corpus.corpus or "default corpus"
    if max_tokens:
        tokens = tokens[:max_tokens]
    batch = ev.batch_size(batch_size)
    t0 = time.perf_counter()
    r = sliding_window_nll(
        ev.model, tokens, context, stride, batch, ev.tokenizer.token_bytes(), ev.autocast(), progress
    )
    return {
        **summarize(r),
        "source": source,
        "context": context,
        "stride": stride,
        "batch": batch,  # windows per forward pass; 1 for batch-dependent quantization (see batch_requested)
        "batch_requested": batch_size,
        "dtype": str(ev.dtype).removeprefix("torch."),
        "time_s": time.perf_counter() - t0,
    }


@dataclass
class CorpusArgs:
    corpus: str | None = None  # text folder/file or HF dataset to score (default: the run's held-out split)
    file_glob: str = "**/*.py"  # files of a folder corpus
    text_field: str = "text"  # column of a jsonl/parquet/HF corpus
    hf_config: str | None = None  # HF dataset configuration
    hf_split: str = "test"  # HF dataset split

    def data_config(self) -> DataConfig | None:
        if self.corpus is None:
            return None
        return DataConfig(
            corpus=self.corpus,
            file_glob=self.file_glob,
            text_field=self.text_field,
            hf_config=self.hf_config,
            hf_split=self.hf_split,
        )


@dataclass
class Args(EvalOptions):
    text: CorpusArgs = field(default_factory=CorpusArgs)
    context: int | None = None  # window length (default: the model's max_seq_len)
    stride: int | None = None  # default: context / 2; must be below context
    batch_size: int = 8  # windows per forward pass
    max_tokens: int | None = None  # evaluate only the first N tokens


def main(argv=None):
    a = parse_args(Args(), argv)
    ev = a.load()
    r = evaluate_perplexity(ev, a.text.data_config(), a.context, a.stride, a.batch_size, a.max_tokens)
    out = ev.write("perplexity", r, a.out)
    bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
    print(
        f"{ev.name}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}, bits/byte {bpb} "
        f"over {r['tokens_scored']:,} tokens ({r['source']}) -> {out}"
    )


if __name__ == "__main__":
    run_main(main)
