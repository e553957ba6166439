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
  in batches;
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
from runtime.generate import generate_ids
from runtime.sampling import SamplingParams

MODEL_NAME = "perhead-llama"


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
            for j, i in enumerate(idx):  # right padding: a causal model's real positions never see it
                x[j, : len(rows[i][0])] = torch.tensor(rows[i][0])
            with self.ev.autocast():
                logp = F.log_softmax(model(x.to(device)).float(), dim=-1)
            for j, i in enumerate(idx):
                inp, cont = rows[i]
                target = torch.tensor(cont, device=device)
                lp = logp[j, len(inp) - len(cont) : len(inp)]
                out[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
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
