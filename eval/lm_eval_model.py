"""This project's models (and Hugging Face folders, through the same loader) as an lm-evaluation-harness model.

    python -m eval.lm_eval_cli run --model perhead-llama --model_args checkpoint=checkpoints/tiny \\
        --tasks my_task --include_path my_tasks/ --device cpu --limit 50
    python -m eval.lm_eval_cli run --model hf --model_args pretrained=hf/pythia-160m ...   # lm-eval's own, beside it

is lm-eval's own command line (``lm_eval run ...``) with the model ``perhead-llama`` registered beside every
model lm-eval registers itself; every harness option works. ``--device`` goes to the harness's option, not
into ``--model_args``. ``python -m eval.harness`` runs tasks one at a time through the same adapter and
records each task's time and energy.

The adapter is lm-eval's ``TemplateLM`` (its ``loglikelihood`` and ``_encode_pair``: empty contexts, trailing
spaces) with what its ``hf`` model (HFLM) does for the rest, so the figures equal HFLM's for the same model:
- tokens: HFLM's ``tok_encode``: ``add_bos_token`` unset means the tokenizer's own default (a Llama tokenizer
  and this project's put ``<s>`` first, GPT-2/NeoX/Starcoder2 put nothing), True/False force it, and a text
  that already starts with the BOS string gets no second one;
- ``_loglikelihood_tokens``: the input is cut to the last ``max_length`` tokens, sorted by length, right-padded
  in batches, the output projection run only on the positions that predict a continuation (a rolling window's
  context and a request's context are never read: the same logits, less work); requests that share their
  context (the choices of a multiple-choice item) are scored in one packed row instead: the context once, each
  continuation after it seeing the context and itself only, at the positions it would have alone
  (``packed_row``), as vLLM's prefix caching computes a shared prompt once. The first packed batch of a model
  is checked against the plain forward; a model where the two differ (an architecture that ignores position ids
  or a custom mask) is scored plainly from then on;
- ``loglikelihood_rolling``: lm-eval's own ``get_rolling_token_windows`` + ``make_disjoint_window`` over the
  document as ``tok_encode`` gives it, after the prefix token (BOS, else EOS); the windows of all documents
  gathered and scored ``batch_size`` at a time, as HFLM batches them;
- ``generate_until``: requests grouped by their generation settings and each group's contexts batched (left
  padding), each encoded as above and cut from the left to ``max_length - max_gen_toks``, greedy or sampled
  decoding of ``max_gen_toks`` tokens, stopped at EOS, and the text cut at the first stop string, EOS's text
  included (``handle_stop_sequences``, ``postprocess_generated_text``).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval's own models: registering ours must not hide them)
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from common.cli import UserError
from common.progress import Progress
from eval.model import load_for_eval
from eval.perplexity import hflm_tokens
from models.hf import HFModel
from runtime.generate import generate_ids
from runtime.quantize import BATCH_DEPENDENT_SCHEMES
from runtime.sampling import SamplingParams

MODEL_NAME = "perhead-llama"
PACK_CHECK_ATOL = 1e-4  # nats: a packed row's scores against the plain forward's, on the first packed batch


def _crops_keys(model) -> bool:
    """Whether a layer of ``model`` crops keys by position (a sliding window), which a packed row's mask would
    override."""
    return isinstance(model, HFModel) and bool(model.cropping_cache_layers())


def packed_row(ctx: list[int], conts: list[list[int]]) -> tuple[list[int], list[int], torch.Tensor, list[list[int]]]:
    """One row scoring every continuation after one shared context: (tokens, positions, mask (T, T): True where
    a query may attend, and for each continuation the row indices whose logits predict its tokens). The context
    comes once; each continuation but its last token follows, at the positions it would have after the context
    alone, attending to the context and to itself only. Its first token is predicted by the context's last
    position, as in its own forward."""
    tokens, positions, segment = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    where = []
    for j, cont in enumerate(conts, 1):
        rows = [len(ctx) - 1]
        for m, t in enumerate(cont[:-1]):
            rows.append(len(tokens))
            tokens.append(t)
            positions.append(len(ctx) + m)
            segment.append(j)
        where.append(rows)
    seg = torch.tensor(segment)
    T = len(tokens)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return tokens, positions, causal & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None])), where


def packed_batch(rows: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed rows (``packed_row``) right-padded into one batch: tokens and positions (B, T), the mask (B, T, T)
    (a padding query attends to itself only, so nothing in the row turns NaN) and ``keep`` (B, T): the positions
    whose logits predict a continuation's token (the context's others are never read, so never computed)."""
    width = max(len(r[0]) for r in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
    keep = torch.zeros(len(rows), width, dtype=torch.bool)
    for j, (tokens, positions, allowed, where) in enumerate(rows):
        n = len(tokens)
        x[j, :n], pos[j, :n], mask[j, :n, :n] = torch.tensor(tokens), torch.tensor(positions), allowed
        for w in where:
            keep[j, w] = True
    return x, pos, mask, keep


def token_scores(logits: torch.Tensor, target: torch.Tensor, sizes: list[int]) -> list[tuple[float, bool]]:
    """(sum of log p, greedy) of consecutive continuations: ``logits`` (N, V) at the positions that predict
    ``target``'s N tokens, ``sizes`` the continuations' lengths in order. One log-softmax over all of them:
    hundreds of small operations, one per continuation, cost more than the forward on a CPU with another job
    beside it."""
    logp = F.log_softmax(logits, dim=-1)
    token_lp = logp.gather(-1, target[:, None])[:, 0]
    hit = logp.argmax(-1) == target
    return [(float(a.sum()), bool(h.all())) for a, h in zip(token_lp.split(sizes), hit.split(sizes), strict=True)]


def continuation_scores(logits, keep, wheres: list[list[list[int]]], conts: list[list[list[int]]]) -> list[list]:
    """``token_scores`` of every continuation of a packed batch, row by row, from the logits of its kept
    positions (N, V): a position several continuations read (the context's last) is read by each."""
    row_of = (keep.flatten().cumsum(0) - 1).view(keep.shape)  # (row, position) -> row of ``logits``
    flat = [(j, w, t) for j in range(len(conts)) for where, cont in zip(wheres[j], conts[j], strict=True)
            for w, t in zip(where, cont, strict=True)]  # fmt: skip
    sel = logits[row_of[[j for j, _, _ in flat], [w for _, w, _ in flat]].to(logits.device)]
    target = torch.tensor([t for *_, t in flat], device=logits.device)
    scores = iter(token_scores(sel, target, [len(cont) for row in conts for cont in row]))
    return [[next(scores) for _ in row] for row in conts]


@register_model(MODEL_NAME)
class ProjectLM(TemplateLM):
    def __init__(
        self,
        checkpoint: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 8,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,  # lm-eval passes it to every model; batches here are fixed
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise UserError(
                f"unknown --model_args key(s) {sorted(unknown)}; {MODEL_NAME} takes checkpoint, device, dtype, "
                "batch_size, max_length, add_bos_token, max_gen_toks"
            )
        self.ev = load_for_eval(checkpoint, "auto" if device in (None, "") else device, dtype)
        self.max_length = int(max_length or self.ev.model.params.max_seq_len)
        # lm-eval passes model_args as strings ("True"); HFLM reads them the same way
        self.add_bos_token = None if add_bos_token in (None, "None") else str(add_bos_token).lower() == "true"
        self.max_gen_toks = int(max_gen_toks)
        # one sequence at a time where a quantization scheme makes results depend on the batch (eval/model.py)
        self.batch_size = self.ev.batch_size(8 if str(batch_size).startswith("auto") else int(batch_size))
        self.requests = {"loglikelihood": 0, "loglikelihood_rolling": 0, "generate_until": 0}  # served, by type
        # shared contexts packed into one row, unless a sequence's result depends on what shares its batch
        self.pack, self.pack_checked = (
            self.ev.scheme not in BATCH_DEPENDENT_SCHEMES and not _crops_keys(self.ev.model),
            False,
        )

    # -- tokens, as HFLM makes them ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.ev.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.ev.tokenizer.bos_id  # BOS where the tokenizer has one, else EOS (HFTokenizer.bos_id)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return hflm_tokens(self.ev.tokenizer, string, add_special_tokens, self.add_bos_token)

    # -- the three request types ------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.requests["loglikelihood"] += len(requests)
        return super().loglikelihood(requests, disable_tqdm)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request
        ((texts), context tokens, continuation tokens)."""
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        groups = self._shared_contexts(requests) if self.pack else []
        if groups and not self.pack_checked:
            groups = self._check_packing(requests, groups, out)
        scores = self._score_packed([[requests[i] for i in g] for g in groups], disable_tqdm)
        for g, group_scores in zip(groups, scores, strict=True):
            for i, r in zip(g, group_scores, strict=True):
                out[i] = r
        rest = [i for i in range(len(requests)) if out[i] is None]
        for i, r in zip(rest, self._score_plain([requests[i] for i in rest], disable_tqdm), strict=True):
            out[i] = r
        return out

    def _check_packing(self, requests, groups: list[list[int]], out: list) -> list[list[int]]:
        """The first packed batch of this model, scored both ways into ``out``: packed rows that score otherwise
        than the plain forward turn packing off for good. The groups left to score."""
        first = groups[: self.batch_size]
        idx = [i for g in first for i in g]
        plain = self._score_plain([requests[i] for i in idx], True)
        packed = [r for scores in self._score_packed([[requests[i] for i in g] for g in first]) for r in scores]
        self.pack_checked = True
        self.pack = all(
            abs(a[0] - b[0]) <= PACK_CHECK_ATOL and a[1] == b[1] for a, b in zip(plain, packed, strict=True)
        )
        if not self.pack:
            print(
                f"{MODEL_NAME}: this model scores a packed row otherwise than its requests alone; shared contexts "
                "are scored one request at a time"
            )
        for i, r in zip(idx, packed if self.pack else plain, strict=True):
            out[i] = r
        return groups[self.batch_size :] if self.pack else []

    def _shared_contexts(self, requests) -> list[list[int]]:
        """Indices of requests sharing one context, two or more to a group, each request whole (not cut to
        ``max_length``) and its packed row no longer than ``max_length``: what ``_score_packed`` may take."""
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if ctx and cont and len(ctx) + len(cont) <= self.max_length + 1:
                by_context.setdefault(tuple(ctx), []).append(i)
        groups = []
        for ctx, members in by_context.items():
            if len(members) > 1 and len(ctx) + sum(len(requests[i][2]) - 1 for i in members) <= self.max_length:
                groups.append(members)
        return groups

    def _score_packed(self, groups: list[list], disable_tqdm: bool = True) -> list[list[tuple[float, bool]]]:
        """Each group's requests (one shared context) scored from one packed row (``packed_row``); the rows
        sorted by length and ``batch_size`` to a batch (``packed_batch``)."""
        model, device = self.ev.model, self.ev.device
        rows = [packed_row(g[0][1], [cont for _, _, cont in g]) for g in groups]
        out: list[list[tuple[float, bool]] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        quiet = disable_tqdm or len(order) < 64
        for b in Progress(range(0, len(order), self.batch_size), desc="loglikelihood (shared contexts)", disable=quiet):
            idx = order[b : b + self.batch_size]
            conts = [[cont for _, _, cont in groups[i]] for i in idx]
            x, pos, mask, keep = packed_batch([rows[i] for i in idx])
            with self.ev.autocast():
                logits = model(x.to(device), pos.to(device), mask[:, None].to(device), keep=keep.to(device)).float()
            scores = continuation_scores(logits, keep, [rows[i][3] for i in idx], conts)
            for i, row_scores in zip(idx, scores, strict=True):
                out[i] = row_scores
        return out

    def _score_plain(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each request in its own row, as HFLM scores it."""
        model, device = self.ev.model, self.ev.device
        rows = [((ctx + cont)[-(self.max_length + 1) :][:-1], cont) for _, ctx, cont in requests]
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        # HFLM's order (its Collator's key): longest first, ties by the tokens, so similar lengths share a batch
        whole = [ctx + cont for _, ctx, cont in requests]
        order = sorted(range(len(rows)), key=lambda i: (-len(whole[i]), tuple(whole[i])))
        quiet = disable_tqdm or len(order) < 64
        for b in Progress(range(0, len(order), self.batch_size), desc="loglikelihood", disable=quiet):
            idx = order[b : b + self.batch_size]
            width = max(len(rows[i][0]) for i in idx)
            x = torch.zeros(len(idx), width, dtype=torch.long)
            keep = torch.zeros(len(idx), width, dtype=torch.bool)  # the positions that predict a continuation
            for j, i in enumerate(idx):  # right padding: a causal model's real positions never see it
                inp, cont = rows[i]
                x[j, : len(inp)] = torch.tensor(inp)
                keep[j, len(inp) - len(cont) : len(inp)] = True
            with self.ev.autocast():  # (kept positions, V), row by row: each request's continuation in order
                logits = model(x.to(device), keep=keep.to(device)).float()
            target = torch.tensor([t for i in idx for t in rows[i][1]], device=device)
            for i, r in zip(idx, token_scores(logits, target, [len(rows[i][1]) for i in idx]), strict=True):
                out[i] = r
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """As HFLM: the rolling windows of every document gathered in order, ``batch_size`` of them at a time
        sorted by length into one batch, then each document's windows summed in order."""
        self.requests["loglikelihood_rolling"] += len(requests)
        windows, owner = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append((None, *lm_utils.make_disjoint_window(w)))
                owner.append(k)
        scores = []
        for b in Progress(range(0, len(windows), self.batch_size), desc="rolling windows", disable=disable_tqdm):
            scores += self._loglikelihood_tokens(windows[b : b + self.batch_size], disable_tqdm=True)
        out = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, scores, strict=True):
            out[k] += ll
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """As HFLM: requests grouped by their generation settings (stops, length, sampling), each group's
        contexts batched by length (runtime.generate.generate_ids: left-padded, each row decoded as alone)."""
        self.requests["generate_until"] += len(requests)
        eos = self.ev.tokenizer.special_text(self.eot_token_id)
        groups: dict[SamplingParams, list[tuple[int, list[int]]]] = {}
        for k, (context, gen_kwargs) in enumerate(r.args for r in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise UserError(f"max_gen_toks {max_gen_toks} must be below the model's length {self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_gen_toks) :]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            how = SamplingParams(max_gen_toks, temperature, kwargs.get("top_p"), stop=until)
            groups.setdefault(how, []).append((k, ids))
        out: list[str] = [""] * len(requests)
        for how, members in groups.items():
            new = generate_ids(self.ev, [ids for _, ids in members], how, self.batch_size)
            for (k, _), [ids] in zip(members, new, strict=True):
                text = self.ev.tokenizer.decode(ids)
                out[k] = postprocess_generated_text(text, stop=list(how.stop), think_end_token=None)
        return out
