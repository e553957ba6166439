"""This project's models (and Hugging Face folders, through the same loader) as an lm-evaluation-harness model.

    python -m eval.lm_eval_cli run --model perhead-llama --model_args checkpoint=checkpoints/tiny \\
        --tasks my_task --include_path my_tasks/ --device cpu --limit 50

is lm-eval's own command line (``lm_eval run ...``) with the model ``perhead-llama`` registered first (by
importing this module); every harness option works. ``--device`` goes to the harness's option, not into
``--model_args``. ``python -m eval.harness`` runs tasks one at a time through the same adapter and records
each task's time and energy.

The three request types follow lm-eval's HFLM, so scores compare with its numbers for the same model:
- ``loglikelihood(context, continuation)``: trailing spaces of the context move to the continuation, the
  pair is encoded whole and the continuation is the tokens after the context's (HFLM's ``_encode_pair``);
  an empty context is replaced by the prefix token; no BOS is added (HFLM's ``add_bos_token=False``); the
  input is cut to the last ``max_length`` tokens.
- ``loglikelihood_rolling(text)``: disjoint rolling windows after the prefix token (eval.perplexity's
  ``document_nll``, the same windows as lm-eval's ``get_rolling_token_windows``).
- ``generate_until(context, gen_kwargs)``: eval.generate's batched generation, cut at the first stop string.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from common.cli import UserError
from eval.generate import complete, cut_at_stops
from eval.model import load_for_eval
from eval.perplexity import document_nll

MODEL_NAME = "perhead-llama"


@register_model(MODEL_NAME)
class ProjectLM(LM):
    def __init__(
        self,
        checkpoint: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it to every model; batches here are fixed
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise UserError(
                f"unknown --model_args key(s) {sorted(unknown)}; {MODEL_NAME} takes checkpoint, device, dtype, "
                "batch_size, max_length"
            )
        self.ev = load_for_eval(checkpoint, "auto" if device in (None, "") else device, dtype)
        self.max_length = int(max_length or self.ev.model.params.max_seq_len)
        # one sequence at a time where a quantization scheme makes results depend on the batch (eval/model.py)
        self.batch_size = self.ev.batch_size(8 if str(batch_size).startswith("auto") else int(batch_size))
        self.requests = {"loglikelihood": 0, "loglikelihood_rolling": 0, "generate_until": 0}  # served, by type

    # -- encoding ----------------------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return self.ev.tokenizer.encode(text, bos=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.ev.tokenizer.bos_id], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.tok_encode(context + continuation), self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # -- the three request types ------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair."""
        model, device = self.ev.model, self.ev.device
        rows = []
        for ctx, cont in pairs:
            full = (ctx + cont)[-(self.max_length + 1) :]
            rows.append((full[:-1], len(cont)))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        for b in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=len(order) < 64):
            idx = order[b : b + self.batch_size]
            width = max(len(rows[i][0]) for i in idx)
            x = torch.zeros(len(idx), width, dtype=torch.long)
            for j, i in enumerate(idx):  # right padding: a causal model's real positions never see it
                x[j, : len(rows[i][0])] = torch.tensor(rows[i][0])
            with self.ev.autocast():
                logp = F.log_softmax(model(x.to(device)).float(), dim=-1)
            for j, i in enumerate(idx):
                inp, n = rows[i]
                cont = torch.tensor(pairs[i][1][-n:], device=device)
                lp = logp[j, len(inp) - n : len(inp)]
                out[i] = (float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.requests["loglikelihood"] += len(requests)
        return self.loglikelihood_tokens([self.encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self.requests["loglikelihood_rolling"] += len(requests)
        docs = [self.tok_encode(r.args[0]) for r in requests]
        with torch.no_grad():
            nll = document_nll(self.ev.model, docs, self.ev.tokenizer.bos_id, self.max_length, self.ev.autocast())
        return [-x for x in nll]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self.requests["generate_until"] += len(requests)
        out = []
        for r in requests:  # one at a time: each request carries its own stop strings and length
            context, kw = r.args
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            text = complete(
                self.ev,
                [context],
                int(kw.get("max_gen_toks", 256)),
                temperature=float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0,
                stop_strings=until,
                progress=False,
            )[0][0]
            out.append(cut_at_stops(text, until))
        return out
