"""Engines that hold several sequences at once, each in its own slot of the KV cache (continuous batching): a
sequence joins a free slot with ``open`` (its prompt run into that slot alone) and then advances one token per
``step`` together with every other open slot, each at its own position, until it is ``close``d. A sequence's
slot is free for the next one as soon as it ends, so requests join and leave the running batch at any step, as
in vLLM and TGI (without paged attention: a slot holds a whole context).

- ``TorchSlots``: this project's models (a static KV cache of ``max_batch`` rows), eager or with the decode
  step under torch.compile (one graph per batch size, batch sizes rounded up to powers of two, compiled at
  start-up by their ``check``);
- ``HFSlots``: Hugging Face folders under eager PyTorch (one transformers ``DynamicCache``, rows aligned at
  their right end, padding hidden by the attention mask, each token at its own position id);
- any other engine is a decoder of runtime/decoding.py itself (ONNX Runtime and OpenVINO, whose exported step
  holds one sequence; a Hugging Face model with sliding-window layers): a ``Slots`` of one slot, one sequence
  at a time, said so in its ``note``.

``Slots.check`` decodes prompts joining a batch at different steps and compares each with eager greedy
decoding of that prompt alone, token for token, before an engine serves anything, through the decode loop the
server runs (runtime/loop.py).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from common.cli import UserError
from llama.generation import decode_one_token, prefill
from models.hf import HFModel, available_memory
from models.interface import capabilities, require
from runtime.compile import compiled as compiled_fn
from runtime.decoding import Decoder, TorchDecoder, own_view
from runtime.engines import DeviceSteps, Slots


def _bucket(n: int, most: int) -> int:
    """The batch size a step of ``n`` sequences runs at: the next power of two (at most ``most``), so that a
    compiled step has a handful of graphs, not one per batch size."""
    return min(most, 1 << (n - 1).bit_length())


class TorchSlots(Slots):
    """This project's model with a KV cache of ``max_batch`` rows, one per slot, each ``cache_len`` positions
    (default: the whole context). Two levels: ``open``/``step`` (ids and positions as Python ints in, float32
    CPU logits out: what the server's scheduler samples from) are built on ``fill``/``advance`` (tensors on the
    device in and out, no host sync: what eval/latency.py times, so that the study's latency is this engine's).

    ``mode`` compiles the decode step (runtime/compile.py: eager, compile, compile+cudagraphs); ``prefill_mode``
    the prompt's forward, eager by default: the server's prompts have every length, and a compiled prefill would
    be a graph per length."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        max_batch: int,
        mode: str = "eager",
        cache_len: int | None = None,
        prefill_mode: str = "eager",
    ):
        if not capabilities(model).static_cache:
            raise UserError(f"batched decoding needs a static KV cache; a {model.family} model has none")
        self.model, self.device, self.max_batch = model, device, max_batch
        self.S = cache_len or model.params.max_seq_len
        self.name = {"eager": "torch"}.get(mode, mode)
        what = "eager PyTorch" if mode == "eager" else f"the decode step under {mode}"
        self.note = f"{what}, continuous batching of up to {max_batch} sequences (static KV cache per sequence)"
        self.decode = compiled_fn(decode_one_token, mode, device)
        self.prefill = compiled_fn(prefill, prefill_mode, device)
        self._check_memory()
        self.view = own_view(model)  # the engine's own modules (the model's weights) for its own cache
        self.ready = False  # the view holds its cache (set up at first use, after a release)
        self.arange = torch.arange(self.S, device=device)  # prompt positions, sliced (no kernel per prompt)

    def _check_memory(self):
        dtype = self.model.tok_embeddings.weight.dtype
        per_row = sum(
            2 * layer.attention.n_kv_heads * self.S * self.model.params.head_dim for layer in self.model.layers
        )
        need = per_row * self.max_batch * torch.empty((), dtype=dtype).element_size()
        free = available_memory() if self.device.type == "cpu" else torch.cuda.mem_get_info(self.device)[0]
        if free is not None and need > 0.8 * free:
            raise UserError(
                f"--max-batch {self.max_batch} needs {need / 2**30:.1f} GiB of KV cache ({self.S} positions per "
                f"sequence) and {free / 2**30:.1f} GiB is free; use a smaller --max-batch"
            )

    @contextlib.contextmanager
    def _one_row(self, slot: int):
        """The model's caches narrowed to one slot's row (views: what the prompt writes lands in that row), so
        the prompt runs as a batch of one, exactly as it would alone. Written by hand: the model's forward knows
        rows 0..B-1 only, and a view is the one way to hand it row ``slot`` without copying the cache."""
        self._cache()
        caches = [layer.attention.kv_cache for layer in self.view.layers]
        whole = [(c.k_cache, c.v_cache) for c in caches]
        try:
            for c, (k, v) in zip(caches, whole, strict=True):
                c.k_cache, c.v_cache = k[slot : slot + 1], v[slot : slot + 1]
            yield
        finally:
            for c, (k, v) in zip(caches, whole, strict=True):
                c.k_cache, c.v_cache = k, v

    def _cache(self) -> None:
        if not self.ready:
            self.view.setup_caches(self.max_batch, self.S)
            self.ready = True

    def _prompt(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.prefill(self.view, tokens, self.arange[: tokens.shape[1]])

    @torch.no_grad()
    def fill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prompts (B, T) on the device into rows 0..B-1; (B, V) logits of their next tokens, on the device."""
        if not 0 < tokens.shape[0] <= self.max_batch or not 0 < tokens.shape[1] < self.S:
            raise UserError(f"prompts of shape {tuple(tokens.shape)} do not fit {self.max_batch} rows of {self.S}")
        self._cache()
        return self._prompt(tokens)

    @torch.no_grad()
    def advance(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows 0..n-1's next tokens (n, 1) at their ``positions`` (n, 1), on the device -> (n, V) logits there."""
        self._cache()
        return self.decode(self.view, tokens, positions)

    def positions(self, pos: int, rows: int | None = None) -> torch.Tensor:
        """The positions ``advance`` takes when every one of ``rows`` (default: all) is at ``pos``: (rows, 1)."""
        return torch.full((rows or self.max_batch, 1), pos, dtype=torch.long, device=self.device)

    def release(self) -> None:
        """Free this engine's cache (a later call sets up a new one)."""
        self.view.clear_caches()
        self.ready = False

    @torch.no_grad()
    def open(self, slot, ids):
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is not in 0..{self.max_batch - 1}")
        if not 0 < len(ids) < self.S:
            raise UserError(f"a prompt of {len(ids)} tokens does not fit the context of {self.S}")
        with self._one_row(slot):
            return self._prompt(torch.tensor([ids], device=self.device))[0].float().cpu()

    @torch.no_grad()
    def step(self, slots, tokens, positions):
        # Rows 0..n-1 run (n: the highest open slot + 1, rounded up); a row that holds no sequence runs token 0 at
        # position 0 of its own free row, which the next prompt there overwrites.
        n = _bucket(max(slots) + 1, self.max_batch)
        x = torch.zeros(n, 1, dtype=torch.long)
        pos = torch.zeros(n, 1, dtype=torch.long)
        x[slots, 0] = torch.tensor(tokens)
        pos[slots, 0] = torch.tensor(positions)
        logits = self.advance(x.to(self.device), pos.to(self.device))
        return logits[slots].float().cpu()


class HFSlots(Slots):
    """A Hugging Face model (eager) holding up to ``max_batch`` sequences in one transformers ``DynamicCache``,
    one row per open sequence, rows aligned at their right end: the columns before a row's own keys (it joined
    later or with a shorter prompt) are padding its attention mask hides, and every token goes in with its own
    position id, as transformers' ``generate`` runs a left-padded batch. A prompt runs alone in a cache of its
    own and joins by a copy into the batch; a row leaves by a copy of the others, and columns no row uses any
    more are cut. The engine's cache is its own (never the model's ``cache``, which the one-sequence engine uses).

    Written by hand: transformers' own continuous batching (``init_continuous_batching``) schedules and samples
    in its thread, where the server's scheduler needs logits from steps it runs (its samplers, stops and
    logprobs are the same for every engine)."""

    def __init__(self, model: nn.Module, device: torch.device, max_batch: int):
        from transformers import DynamicCache

        self.model, self.hf, self.device, self.max_batch = model, model.hf, device, max_batch
        self._cache_arg = model._cache_arg
        self.new_cache = lambda: DynamicCache(config=self.hf.config)
        if cropping := model.cropping_cache_layers():  # a sliding window: right-aligned rows would break it
            raise UserError(f"a {model.family} model's cache ({', '.join(cropping)}) does not batch here")
        self.name = "torch"
        self.note = f"eager PyTorch (transformers), continuous batching of up to {max_batch} sequences"
        self.cache = None
        self.rows: list[int] = []  # the slot of each cache row
        self.valid = torch.zeros(0, 0, dtype=torch.long)  # (rows, columns): 1 where a row holds its own key

    def _mask(self, valid: torch.Tensor) -> torch.Tensor:
        """The attention mask of a step from ``valid`` (rows, columns): prepared in 4D, (rows, 1, 1, columns), for
        the families and attention kernels that take one as it is, else ``valid`` itself. transformers builds the
        4D mask from a 2D one at every step (masking_utils), about a tenth of a step at batch 8 of a small model
        (2.2 ms against 2.0 here); a prepared one it passes on unchanged."""
        impl = getattr(self.hf.config, "_attn_implementation", None)
        if not capabilities(self.model).prepared_mask or impl not in ("sdpa", "eager"):
            return valid
        keep = valid.bool()[:, None, None, :]
        return keep if impl == "sdpa" else self.model.additive_mask(keep)  # SDPA takes it boolean as it is

    def _forward(self, ids: torch.Tensor, cache, mask: torch.Tensor | None, positions: torch.Tensor):
        out = self.hf(
            input_ids=ids.to(self.device),
            attention_mask=None if mask is None else self._mask(mask).to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        return out.logits[:, -1].float().cpu()

    @torch.no_grad()
    def open(self, slot, ids):
        if slot in self.rows or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is taken or not in 0..{self.max_batch - 1}")
        if not 0 < len(ids) < self.model.params.max_seq_len:
            raise UserError(
                f"a prompt of {len(ids)} tokens does not fit the context of {self.model.params.max_seq_len}"
            )
        alone = self.new_cache()
        logits = self._forward(torch.tensor([ids]), alone, None, torch.arange(len(ids))[None])
        self._join(slot, alone, len(ids))
        return logits[0]

    def _join(self, slot: int, alone, n: int) -> None:
        """Copy a prompt's cache (one row of ``n`` columns) into the batch as its last row, padding on the left
        whichever of the two is shorter."""
        width = self.valid.shape[1]
        pad_batch, pad_new = max(0, n - width), max(0, width - n)
        for layer, own in zip(self.cache.layers if self.cache else [], alone.layers, strict=False):
            layer.keys, layer.values = (
                torch.cat([_left_pad(a, pad_batch), _left_pad(b, pad_new)])
                for a, b in ((layer.keys, own.keys), (layer.values, own.values))
            )
        if self.cache is None:
            self.cache = alone
        row = torch.cat([torch.zeros(pad_new, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        self.valid = torch.cat([torch.nn.functional.pad(self.valid, (pad_batch, 0)), row[None]])
        self.rows.append(slot)

    @torch.no_grad()
    def step(self, slots, tokens, positions):
        if sorted(slots) != sorted(self.rows):
            raise ValueError(f"step of slots {sorted(slots)}: the open ones are {sorted(self.rows)}")
        where = {s: i for i, s in enumerate(slots)}
        order = [where[s] for s in self.rows]  # the step's inputs in row order
        self.valid = torch.cat([self.valid, torch.ones(len(self.rows), 1, dtype=torch.long)], 1)
        ids = torch.tensor([[tokens[i]] for i in order])
        pos = torch.tensor([[positions[i]] for i in order])
        logits = self._forward(ids, self.cache, self.valid, pos)
        return logits[[self.rows.index(s) for s in slots]]

    def close(self, slot):
        if slot not in self.rows:
            return
        keep = [i for i, s in enumerate(self.rows) if s != slot]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.valid = None, torch.zeros(0, 0, dtype=torch.long)
            return
        self.valid = self.valid[keep]
        cut = int(self.valid.any(0).long().argmax())  # columns before any remaining row's first key
        self.valid = self.valid[:, cut:]
        index = torch.tensor(keep, device=self.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, cut:], layer.values[index, :, cut:]


def _left_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, T, D) keys or values with ``n`` zero columns before T."""
    return torch.nn.functional.pad(x, (0, 0, n, 0)) if n else x


def build_slots(decoder: Decoder, model: nn.Module, device: torch.device, max_batch: int) -> Slots:
    """The batching engine for ``decoder``: its model in ``max_batch`` slots where the engine allows it (this
    project's models under eager PyTorch or torch.compile), else the decoder itself, one sequence at a time."""
    if decoder.name in ("torch", "compile") and capabilities(model).static_cache:
        if max_batch > 1:
            return TorchSlots(model, device, max_batch, "compile" if decoder.name == "compile" else "eager")
        return decoder.alone("--max-batch 1")
    if decoder.name == "torch" and isinstance(model, HFModel):  # a Hugging Face model, eager
        if max_batch == 1:
            return decoder.alone("--max-batch 1")
        try:
            return HFSlots(model, device, max_batch)
        except UserError as e:
            return decoder.alone(str(e))
    return decoder.alone("this engine does not batch")


def timed_engine(
    model: nn.Module, device: torch.device, batch: int, cache_len: int, mode: str = "eager", prefill_mode: str = "eager"
) -> DeviceSteps:
    """The engine the server decodes ``model`` with, holding ``batch`` sequences of ``cache_len`` positions, for
    eval/latency.py to time through its device-level calls (``fill``, ``advance``, ``positions``, ``release``):
    ``TorchSlots`` for a model with a static KV cache; else ``TorchDecoder``, whose growing cache takes a batch of
    equal-length prompts too (eager only: compile and CUDA graphs need static shapes)."""
    if capabilities(model).static_cache:
        return TorchSlots(model, device, batch, mode, cache_len, prefill_mode)
    for m in {mode, prefill_mode} - {"eager"}:
        require(model, "static_cache", f"mode {m}")
    decoder = TorchDecoder(model, device)
    decoder.need = cache_len
    return decoder
