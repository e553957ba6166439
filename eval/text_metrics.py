"""BLEU, chrF and ROUGE of generations against real reference text.

Two tasks, neither with references written here: (1) held-out continuations: the prompt is the first
``prompt_tokens`` tokens of a held-out document and the reference its next ``continuation_tokens`` tokens;
(2) HumanEval: the prompt is a function's signature and docstring, the reference its canonical solution.
BLEU and chrF come from sacrebleu (corpus level), ROUGE-1/2/L F1 from rouge-score (mean over pairs), all on
a 0-100 scale. ROUGE comes twice: ``rouge*`` with rouge-score's default tokenizer (comparable with
published figures; it keeps only lowercase [a-z0-9] runs, so operators, brackets and non-Latin text are
ignored) and ``rouge*_code`` with a tokenizer that keeps every word and every symbol, case included.
"""

from __future__ import annotations

import re

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

from common.cli import UserError
from data.heldout import heldout_texts, model_data
from data.prepare import split_documents_at_bos
from eval.model import Evaluated
from runtime.generate import complete
from runtime.sampling import SamplingParams

ROUGE_TOKENIZERS = {
    "default": "rouge-score's default: lowercased, only [a-z0-9] runs kept (code symbols, non-Latin text ignored)",
    "code": "every run of word characters (any script) and every other non-space symbol, case kept",
}


class CodeTokenizer:
    """For rouge-score: identifiers, numbers and words of any script, and each operator or bracket."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)


def _rouge(hypotheses: list[str], references: list[str], tokenizer=None) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=tokenizer)
    rouge = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references, strict=True)]
    return {k: 100 * sum(r[k].fmeasure for r in rouge) / len(rouge) for k in ("rouge1", "rouge2", "rougeL")}


def score_texts(hypotheses: list[str], references: list[str]) -> dict:
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need as many hypotheses as references (got {len(hypotheses)} and {len(references)})")
    code = _rouge(hypotheses, references, CodeTokenizer())
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        **_rouge(hypotheses, references),
        **{f"{k}_code": v for k, v in code.items()},
        "rouge_tokenizers": dict(ROUGE_TOKENIZERS),
        "pairs": len(references),
    }


def continuation_pairs(
    ev: Evaluated, n_docs: int, prompt_tokens: int, continuation_tokens: int, heldout_of: str | None = None
):
    """(prompts, references) from the first held-out documents long enough for both parts: the model's own
    held-out split, or ``heldout_of``'s as text, tokenized with the model's tokenizer (a HF model)."""
    if heldout_of is None:
        docs = split_documents_at_bos(model_data(ev.folder).val, ev.tokenizer.bos_id)
    else:
        docs = [np.asarray(x) for x in ev.tokenizer.encode_batch(heldout_texts(heldout_of), bos=False)]
    docs = [d for d in docs if len(d) > prompt_tokens + continuation_tokens]
    docs = docs[:n_docs]
    if not docs:
        raise UserError(
            f"no held-out document has more than {prompt_tokens + continuation_tokens} tokens; "
            "lower --prompt-tokens / --continuation-tokens"
        )
    prompts = [ev.tokenizer.decode(d[:prompt_tokens]) for d in docs]
    refs = [ev.tokenizer.decode(d[prompt_tokens : prompt_tokens + continuation_tokens]) for d in docs]
    return prompts, refs


def continuation_task(
    ev: Evaluated,
    n_docs: int = 50,
    prompt_tokens: int = 128,
    continuation_tokens: int = 64,
    batch_size: int = 8,
    heldout_of: str | None = None,
) -> dict:
    prompts, refs = continuation_pairs(ev, n_docs, prompt_tokens, continuation_tokens, heldout_of)
    hyps = [c[0] for c in complete(ev, prompts, SamplingParams(continuation_tokens), batch_size=batch_size)]
    return {
        **score_texts(hyps, refs),
        "prompt_tokens": prompt_tokens,
        "continuation_tokens": continuation_tokens,
        "decoding": "greedy",
        "examples": [
            {"prompt": p[-200:], "reference": r, "generated": h}
            for p, r, h in list(zip(prompts, refs, hyps, strict=True))[:3]
        ],
    }
