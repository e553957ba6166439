"""Token-level NLL, perplexity and bits-per-byte with a sliding window.

    python -m eval.perplexity checkpoints/tiny                              # the run's held-out split
    python -m eval.perplexity checkpoints/tiny --corpus notes/ --file-glob '**/*.md'
    python -m eval.perplexity checkpoints/run --corpus wikitext --hf-config wikitext-2-raw-v1 --hf-split test
    python -m eval.perplexity hf/pythia-160m --heldout-of checkpoints/tiny --mode lm-eval   # a HF model

Windows of ``context`` tokens start every ``stride`` tokens; each scores only the tokens no earlier window
scored, so with stride < context every token (but the first) is predicted from at least context - stride
tokens of history (stride must be below context, else the first token of every later window would go
unscored). Bits-per-byte divides the summed NLL by the UTF-8 bytes of the scored tokens, which
compares models with different tokenizers.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import UserError, parse_args, ranged, run_main
from common.progress import Progress
from data.config import DataConfig
from data.heldout import LONG_LINE_CHARS, HeldOut, HeldOutDocument, heldout_set, heldout_texts, model_data
from data.prepare import ENCODE_BATCH_DOCS, heldout_documents, iter_documents
from eval.model import EvalOptions


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) of each window over a stream of ``n_tokens`` tokens."""
    if not 0 < stride < context:
        # stride = context would leave the first token of every later window unscored (no history in it)
        raise UserError(f"stride={stride} must be in 1..context-1={context - 1}; use --stride {context - 1} at most")
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


def rolling_windows(n_tokens: int, max_len: int) -> list[tuple[int, int, int]]:
    """lm-evaluation-harness's rolling windows over one document (get_rolling_token_windows with
    context_len=1, then made disjoint), as (first input position, end, first scored target) in a stream that
    starts with one prefix token at position 0 and the document's tokens at 1..n_tokens. Every token of the
    document is scored exactly once; the first window predicts the first token from the prefix alone, each
    later window scores the next at most ``max_len`` tokens from the ``max_len`` tokens before them."""
    if max_len < 1:
        raise UserError(f"max_len={max_len} must be positive")
    out, predicted = [], 0
    while predicted < n_tokens:
        end = predicted + min(max_len, n_tokens - predicted) + 1  # stream positions predicted+1 .. end-1
        out.append((max(0, end - 1 - max_len), end, predicted + 1))
        predicted = end - 1
    return out


@torch.no_grad()
def document_nll(model, docs: list[np.ndarray], prefix_id: int, max_len: int, autocast=None, progress=False):
    """Summed NLL of each document on its own, scored with ``rolling_windows`` (lm-eval's
    loglikelihood_rolling): the per-document figures lm-eval's word and byte perplexity are made from."""
    out = []
    for doc in Progress(docs, desc="documents", unit="doc", disable=not progress):
        stream = torch.as_tensor(np.concatenate([[prefix_id], np.asarray(doc, dtype=np.int64)]))
        total = 0.0
        for begin, end, first in rolling_windows(len(doc), max_len):
            x = stream[begin : end - 1][None].to(next(model.parameters()).device)  # inputs predict begin+1..end-1
            with autocast or nullcontext():
                logits = model(x)
            nll = F.cross_entropy(logits.float()[0], stream[begin + 1 : end].to(logits.device), reduction="none")
            total += nll[first - begin - 1 :].double().sum().item()  # only the targets this window adds
        out.append(total)
    return out


def hflm_tokens(tokenizer, text: str, add_special_tokens: bool | None = None, add_bos_token: bool | None = None):
    """A text's tokens as lm-evaluation-harness's HF model encodes it (HFLM.tok_encode): ``add_special_tokens``
    if given, else ``add_bos_token`` if set, else the tokenizer's own default (Llama's and this project's put
    <s> first, and HFLM scores it like any token; GPT-2/NeoX/Starcoder2 add nothing); and with
    ``add_special_tokens`` unset, a text already starting with the BOS string gets no second one."""
    flag = add_special_tokens if add_special_tokens is not None else add_bos_token
    if add_special_tokens is None and text.startswith(tokenizer.special_text(tokenizer.bos_id)):
        flag = False
    return tokenizer.encode(text, bos=True if flag is None else flag)


def lm_eval_metrics(nll: list[float], texts: list[str]) -> dict:
    r"""lm-evaluation-harness's perplexity metrics (its wikitext task): word_perplexity = exp(sum NLL / words),
    byte_perplexity = exp(sum NLL / UTF-8 bytes), bits_per_byte = sum NLL / bytes / ln 2, words counted as
    ``re.split(r"\s+", text)`` does. Summed over documents before dividing (its weighted_perplexity)."""
    import re

    total = sum(nll)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "mode": "lm-eval",
        "nll_sum": total,
        "documents": len(texts),
        "words": words,
        "bytes": nbytes,
        "word_perplexity": math.exp(total / words),
        "byte_perplexity": math.exp(total / nbytes),
        "bits_per_byte": total / nbytes / math.log(2),
    }


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
    doc_of: np.ndarray | None = None,
) -> dict:
    """Summed NLL (nats) over the scored targets, their count and, given ``token_bytes``, their bytes. Given
    ``doc_of`` (the document each position of ``tokens`` belongs to, 0..n-1), the same three per document:
    a target is its document's, whichever window scored it."""
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    per_doc = None if doc_of is None else np.zeros((3, int(doc_of.max()) + 1))  # nats, tokens, bytes
    device = next(model.parameters()).device
    wins = windows(len(tokens), context, stride)
    # windows of equal length go through the model together; only the last one can be shorter
    groups: dict[int, list] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    nll_sum, n_scored, n_bytes = 0.0, 0, 0
    bar = Progress(total=len(wins), desc="perplexity", unit="window", disable=not progress)
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
                target_bytes = token_bytes[tokens[first:e].numpy()] if token_bytes is not None else None
                if target_bytes is not None:
                    n_bytes += int(target_bytes.sum())
                if per_doc is not None:
                    docs = doc_of[first:e]
                    np.add.at(per_doc[0], docs, scored.double().cpu().numpy())
                    np.add.at(per_doc[1], docs, 1)
                    if target_bytes is not None:
                        np.add.at(per_doc[2], docs, target_bytes)
            bar.update(len(batch))
    bar.close()
    out = {"nll_sum": nll_sum, "tokens_scored": n_scored, "bytes_scored": n_bytes if token_bytes is not None else None}
    if per_doc is not None:
        out["per_document"] = [(float(n), int(t), int(by)) for n, t, by in per_doc.T]
    return out


def summarize(r: dict) -> dict:
    loss = r["nll_sum"] / r["tokens_scored"]
    out = {**r, "loss": loss, "perplexity": math.exp(loss)}
    # bits per byte: nats -> bits, per UTF-8 byte of the scored text (Gao et al., 2020, The Pile)
    out["bits_per_byte"] = r["nll_sum"] / math.log(2) / r["bytes_scored"] if r.get("bytes_scored") else None
    return out


SAMPLE_SEED = 0  # which held-out documents a token budget takes: drawn with this seed, the same for every model


def sample_documents(sizes: list[int], max_tokens: int | None, seed: int = SAMPLE_SEED) -> tuple[list[int], str]:
    """Indices (in split order) of whole documents drawn at random across a split until ``max_tokens`` (at
    least one document), and a sentence saying so; every document when the budget holds them all. The first N
    tokens of a split would be its first few documents (in a code corpus, a few modules of one package): not a
    sample of it."""
    total = sum(sizes)
    if not max_tokens or total <= max_tokens:
        return list(range(len(sizes))), f"all {len(sizes)} documents ({total:,} tokens)"
    chosen, seen = [], 0
    for i in np.random.default_rng(seed).permutation(len(sizes)):
        if chosen and seen + sizes[i] > max_tokens:
            continue
        chosen.append(int(i))
        seen += sizes[i]
    chosen.sort()
    return chosen, (
        f"{len(chosen)} of {len(sizes)} whole documents ({seen:,} of {total:,} tokens), drawn at random "
        f"(seed {seed}) across the split to fit --max-tokens {max_tokens:,}"
    )


def packed_documents(tokens: np.ndarray, bos_id: int) -> list[np.ndarray]:
    """The packed stream cut before each <s>: each piece one document as packed (<s> doc </s>)."""
    starts = [0, *np.flatnonzero(np.asarray(tokens) == bos_id)[1:].tolist(), len(tokens)]
    return [np.asarray(tokens[a:b]) for a, b in zip(starts, starts[1:], strict=False) if b > a]


def corpus_documents(corpus: DataConfig | HeldOut) -> tuple[Iterator[str], str]:
    """The documents of a corpus, or of another checkpoint's held-out split, read as they are asked for, and
    how to name the source."""
    if isinstance(corpus, HeldOut):
        return iter(heldout_texts(corpus.checkpoint)), f"held-out split of {corpus.checkpoint}'s training data, as text"
    return (d.text for d in iter_documents(corpus)), corpus.corpus or "default corpus"


def encoded_documents(texts: Iterator[str], tokenizer, bos: bool, eos: bool, batch: int = ENCODE_BATCH_DOCS):
    """(text, token ids) of each document, tokenized a batch of documents at a time."""
    while chunk := list(itertools.islice(texts, batch)):
        yield from zip(chunk, tokenizer.encode_batch(chunk, bos=bos, eos=eos), strict=True)


def corpus_tokens(corpus: DataConfig | HeldOut, tokenizer, max_tokens: int | None = None) -> tuple[np.ndarray, str]:
    """The packed stream <s> doc </s> <s> doc </s> ... of a corpus, cut at ``max_tokens``: documents are read and
    tokenized only until the budget is reached (a whole corpus tokenized first once took 24 GB)."""
    texts, source = corpus_documents(corpus)
    parts, total = [], 0
    with Progress(
        total=max_tokens, desc="tokenizing", unit="tok", disable=max_tokens is not None and max_tokens < 100_000
    ) as bar:
        for _, ids in encoded_documents(texts, tokenizer, bos=True, eos=True):
            parts.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
            bar.update(len(ids))
            if max_tokens is not None and total >= max_tokens:
                break
    tokens = np.concatenate(parts)
    return (tokens[:max_tokens] if max_tokens else tokens), source


def heldout_pieces(ev, corpus: HeldOut | None, near_duplicates: float | None):
    """The held-out split scored for ``ev``'s model: each kept document packed as the model reads it
    (<s> doc </s>, in its tokenizer), its identity, the documents left out as near-duplicates of training files
    (data/heldout.py), and how to name the source. ``corpus`` None: the model's own training data; HeldOut:
    another checkpoint's, as text (the same documents under another tokenizer)."""
    if corpus is None:
        data = model_data(ev.folder)
        kept, excluded = heldout_set(data, near_duplicates)
        packed = packed_documents(data.val, ev.tokenizer.bos_id)  # each <s> doc </s>, as the data holds it
        return [packed[d.index] for d in kept], kept, excluded, f"held-out split of {data.dir}"
    data = model_data(corpus.checkpoint)
    kept, excluded = heldout_set(data, near_duplicates)
    ids = ev.tokenizer.encode_batch([d.text for d in kept], bos=True, eos=True)
    source = f"held-out split of {corpus.checkpoint}'s training data, as text"
    return [np.asarray(x, dtype=np.int64) for x in ids], kept, excluded, source


def left_out(excluded: list[HeldOutDocument], threshold: float | None, total: int) -> str:
    """The sentence a result's ``sample`` adds about the rule that left documents out."""
    if threshold is None:
        return ""
    return (
        f"; {len(excluded)} of {total} held-out documents left out as near-duplicates of training files (at least "
        f"{threshold:.0%} of their lines of {LONG_LINE_CHARS}+ characters occur verbatim in the training split)"
    )


def document_records(identities: list[HeldOutDocument], figures: list[tuple[float, int, int]]) -> list[dict]:
    """Per scored document: who it is and its nats, tokens and bytes: enough to rescore, bootstrap or subset the
    evaluation without the model."""
    return [
        {"index": d.index, "name": d.name, "sha256": d.sha256, "nats": n, "tokens": t, "bytes": b}
        for d, (n, t, b) in zip(identities, figures, strict=True)
    ]


def evaluate_perplexity(
    ev,
    corpus: DataConfig | None,
    context: int | None,
    stride: int | None,
    batch_size: int,
    max_tokens: int | None,
    progress: bool = True,
    mode: str = "sliding",
    near_duplicates: float | None = None,
) -> dict:
    context = context or ev.model.params.max_seq_len
    if max_tokens is not None and max_tokens < 1:  # never read as "all" (the command line refuses it first)
        raise UserError(f"--max-tokens {max_tokens}: give a number of tokens, at least 1 (or none for all)")
    if near_duplicates is not None and not (corpus is None or isinstance(corpus, HeldOut)):
        raise UserError("--near-duplicates applies to a held-out split (the run's own, or --heldout-of); drop it")
    if near_duplicates is not None and not 0 < near_duplicates <= 1:
        raise UserError(f"--near-duplicates {near_duplicates}: give a fraction of a document's lines in (0, 1]")
    if mode == "lm-eval":
        return _lm_eval_mode(ev, corpus, context, max_tokens, progress, near_duplicates)
    if mode != "sliding":
        raise UserError(f"perplexity mode {mode!r} is unknown; use sliding or lm-eval")
    stride = stride or context // 2
    sample, identities, doc_of, extra = None, None, None, {}
    if corpus is None or isinstance(corpus, HeldOut):
        pieces, kept, excluded, source = heldout_pieces(ev, corpus, near_duplicates)
        chosen, sample = sample_documents([len(p) for p in pieces], max_tokens)
        sample += left_out(excluded, near_duplicates, len(kept) + len(excluded))
        identities = [kept[i] for i in chosen]
        tokens = np.concatenate([pieces[i] for i in chosen])
        doc_of = np.repeat(np.arange(len(chosen)), [len(pieces[i]) for i in chosen])
        extra = _rule(near_duplicates, excluded)
    else:
        tokens, source = corpus_tokens(corpus, ev.tokenizer, max_tokens)
        if max_tokens:
            tokens = tokens[:max_tokens]
            sample = f"the first {len(tokens):,} tokens of the corpus, documents in its order"
    batch = ev.batch_size(batch_size)
    t0 = time.perf_counter()
    r = sliding_window_nll(
        ev.model, tokens, context, stride, batch, ev.tokenizer.token_bytes(), ev.autocast(), progress, doc_of
    )
    if identities is not None:
        extra["per_document"] = document_records(identities, r.pop("per_document"))
    return {
        **summarize(r),
        "mode": "sliding",  # token perplexity over the packed held-out stream (not lm-eval's word perplexity)
        "source": source,
        "sample": sample,  # which part of the source was scored
        "context": context,
        "stride": stride,
        "batch": batch,  # windows per forward pass; 1 for batch-dependent quantization (see batch_requested)
        "batch_requested": batch_size,
        "dtype": str(ev.dtype).removeprefix("torch."),
        "time_s": time.perf_counter() - t0,
        **extra,
    }


def _rule(near_duplicates: float | None, excluded: list[HeldOutDocument]) -> dict:
    """What a result records of the near-duplicate rule: its threshold, and the documents it left out."""
    left = [{"index": d.index, "name": d.name, "sha256": d.sha256, "overlap": d.overlap} for d in excluded]
    return {"near_duplicates": near_duplicates, "long_line_chars": LONG_LINE_CHARS, "excluded": left}


def _lm_eval_mode(
    ev, corpus: DataConfig | None, context: int, max_tokens: int | None, progress: bool, near_duplicates=None
) -> dict:
    """Each document scored on its own as lm-eval's HF model does: encoded as hflm_tokens says, after the
    prefix token (BOS, else EOS), in lm-eval's disjoint rolling windows."""
    tok = ev.tokenizer
    identities, extra = None, {}
    if corpus is None or isinstance(corpus, HeldOut):  # a held-out split: whole documents drawn across it
        if corpus is None:
            data = model_data(ev.folder)
            held = heldout_documents(data.val, tok)  # <s> first, as this project's tokenizer encodes a text
            kept, excluded = heldout_set(data, near_duplicates)
            all_pairs = [(d.text, [tok.bos_id, *held[d.index]]) for d in kept]
            source = f"held-out split of {data.dir}"
        else:
            kept, excluded = heldout_set(model_data(corpus.checkpoint), near_duplicates)
            all_pairs = [(d.text, hflm_tokens(tok, d.text)) for d in kept]
            source = f"held-out split of {corpus.checkpoint}'s training data, as text"
        chosen, sample = sample_documents([len(ids) for _, ids in all_pairs], max_tokens)
        sample += left_out(excluded, near_duplicates, len(kept) + len(excluded))
        pairs = (all_pairs[i] for i in chosen)
        identities = [kept[i] for i in chosen]
        extra = _rule(near_duplicates, excluded)
    else:
        texts, source = corpus_documents(corpus)
        pairs = ((text, hflm_tokens(tok, text)) for text in texts)
        sample = None
    texts, docs, seen = [], [], 0
    for text, ids in pairs:  # whole documents, up to the budget (at least one), read no further
        if max_tokens and docs and seen + len(ids) > max_tokens:
            break
        texts.append(text)
        docs.append(np.asarray(ids))
        seen += len(ids)
    if sample is None:
        sample = f"the first {len(docs)} whole documents of the corpus ({seen:,} tokens)" if max_tokens else None
    t0 = time.perf_counter()
    nll = document_nll(ev.model, docs, tok.bos_id, context, ev.autocast(), progress)
    if identities is not None:
        figures = [(n, len(d), len(t.encode("utf-8"))) for n, d, t in zip(nll, docs, texts, strict=True)]
        extra["per_document"] = document_records(identities, figures)
    return {
        **lm_eval_metrics(nll, texts),
        "tokens_scored": int(sum(len(d) for d in docs)),
        "source": source,
        "sample": sample,
        "context": context,
        "dtype": str(ev.dtype).removeprefix("torch."),
        "time_s": time.perf_counter() - t0,
        **extra,
    }


@dataclass
class CorpusArgs:
    corpus: str | None = None  # text folder/file or HF dataset to score (default: the run's held-out split)
    file_glob: str = "**/*.py"  # files of a folder corpus
    text_field: str = "text"  # column of a jsonl/parquet/HF corpus
    hf_config: str | None = None  # HF dataset configuration
    hf_split: str = "test"  # HF dataset split
    heldout_of: str | None = None  # score the held-out split of this checkpoint's data as text (other tokenizers)
    # leave out held-out documents at least this fraction of whose long lines occur verbatim in the training split
    # (near-duplicates of training files, e.g. generated code-page tables; data/heldout.py); None: keep all
    near_duplicates: float | None = ranged(None, 0, 1, above=True)

    def data_config(self) -> DataConfig | HeldOut | None:
        if self.heldout_of is not None:
            if self.corpus is not None:
                raise UserError("pass --corpus or --heldout-of, not both")
            return HeldOut(self.heldout_of)
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
    EVALUATORS = ("perplexity", "perplexity-lm-eval")
    text: CorpusArgs = field(default_factory=CorpusArgs)
    context: int | None = ranged(None, 1)  # window length (default: the model's max_seq_len)
    stride: int | None = ranged(None, 1)  # default: context / 2; must be below context (sliding mode)
    mode: Literal["sliding", "lm-eval"] = "sliding"  # sliding: token ppl over the packed stream; lm-eval: per document
    batch_size: int = ranged(8, 1)  # windows per forward pass
    max_tokens: int | None = ranged(None, 1)  # at most N tokens: whole held-out documents drawn, or a corpus' first N


def main(argv=None):
    a = parse_args(Args(), argv)
    ev = a.load()
    r = evaluate_perplexity(
        ev,
        a.text.data_config(),
        a.context,
        a.stride,
        a.batch_size,
        a.max_tokens,
        mode=a.mode,
        near_duplicates=a.text.near_duplicates,
    )
    # each mode its own result (results/<model>-perplexity.json, -perplexity-lm-eval.json): their figures differ
    out = ev.write("perplexity" if r["mode"] == "sliding" else "perplexity-lm-eval", r, a)
    bpb = "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
    if r["mode"] == "lm-eval":
        what = f"word perplexity {r['word_perplexity']:.2f}, byte perplexity {r['byte_perplexity']:.4f}"
    else:
        what = f"loss {r['loss']:.4f} nats/token, token perplexity {r['perplexity']:.2f}"
    print(
        f"{ev.name} ({r['mode']} mode): {what}, bits/byte {bpb} over {r['tokens_scored']:,} tokens "
        f"({r['source']}) -> {out}"
    )


if __name__ == "__main__":
    run_main(main)
