"""Runtime engines that decode: one prompt at a time, token by token with a KV cache, each token timed.

- ``torch``: eager PyTorch (this project's models and Hugging Face folders);
- ``compile``: the decode step under torch.compile (static KV cache, so one graph serves every step; the
  prompt runs eager, as gpt-fast does); this project's models;
- ``onnxruntime``: the model exported once with ``torch.export`` -> ONNX, its KV cache passed in and
  returned as tensors (``k0..k{L-1}``, ``v0..v{L-1}``, fixed length ``max_seq_len``; the prompt length is
  dynamic); CPU execution provider, or CUDA where the model is on a GPU and ONNX Runtime has it;
- ``openvino``: the same ONNX file compiled by OpenVINO for the CPU.
TorchScript is left out: ``torch.jit`` is deprecated on the pinned torch (2.13).

Every engine is checked token for token against eager greedy generation (``llama.generation.generate``)
before it is used (``Decoder.check``, through ``runtime.engines.check``); one that differs is reported, not
served.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.cli import UserError
from common.timing import sync
from llama.generation import decode, decode_one_token, generate, prefill
from models.interface import capabilities, require
from runtime.compile import compiled as compiled_fn
from runtime.engines import Slots
from runtime.export import model_folder, ort_session, to_onnx
from runtime.sampling import Completion, SamplingParams

DECODE_ENGINES = ("torch", "compile", "onnxruntime", "openvino")
CACHE_BLOCK = 128  # TorchDecoder's KV cache grows in blocks of this many positions


class Decoder(Slots):
    """One engine's decoding of one sequence (a ``Slots`` of one slot, runtime/engines.py). Subclasses give
    ``start(ids) -> logits`` (the prompt into a fresh cache) and ``next(token, pos) -> logits`` (one step);
    ``open``/``step`` are those for the server's decode loop, ``generate`` decodes one prompt alone (the same
    loop and clock for every engine), and ``check`` compares it with eager greedy generation."""

    name = ""
    note = ""
    max_batch = 1

    def __init__(self, max_seq_len: int, device: torch.device):
        self.max_seq_len, self.device = max_seq_len, device
        self.need = max_seq_len  # positions the current request fills (set by generate)

    def start(self, ids: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def next(self, token: int, pos: int) -> torch.Tensor:
        raise NotImplementedError

    def open(self, slot, ids):
        if slot != 0:
            raise ValueError(f"{self.name} holds one sequence (slot 0), not slot {slot}")
        self.need = self.max_seq_len  # the loop does not say how long the sequence will be: a whole context
        return self.start(ids).float().cpu()

    def step(self, slots, tokens, positions):
        if list(slots) != [0]:
            raise ValueError(f"{self.name} holds one sequence (slot 0), not slots {list(slots)}")
        return self.next(tokens[0], positions[0])[None].float().cpu()

    def alone(self, why: str) -> Decoder:
        """This decoder as the server's engine, its note saying why it decodes one sequence at a time."""
        self.note = self.note.split("; one sequence at a time")[0] + f"; one sequence at a time ({why})"
        return self

    @torch.no_grad()
    def generate(
        self, ids: list[int], how: SamplingParams, eos_id: int | None = None, stop=None, on_token=None
    ) -> Completion:
        """A typed ``Completion`` of ``ids``: the new tokens, drawn as ``how`` says (its stop strings are the
        caller's: ``stop(tokens)``, true once they appear, ends the generation, that token included; EOS ends it,
        not included), the time each was ready, in seconds from the call (the first is the time to first token),
        and why it ended ("stop" or "length"); decoded by the one decode loop (llama.generation.decode) over this
        engine's steps. ``on_token(token, logits)``, if given, hears of each new token as soon as its time is
        taken, with the (V,) float32 logits it was drawn from; an exception it raises ends the generation (a
        client that went away)."""
        max_new_tokens = how.max_tokens
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise UserError(
                f"{len(ids)} prompt tokens + {max_new_tokens} new ones exceed the context {self.max_seq_len}"
            )
        gen = torch.Generator().manual_seed(how.seed)
        times: list[float] = []
        self.need = len(ids) + max_new_tokens  # the positions this request fills (a cache sized to them)
        t0 = time.perf_counter()
        last = [self.start(ids)[None].float().cpu()]  # the logits the next token is drawn from

        def step(tokens: torch.Tensor, i: int) -> torch.Tensor:
            last[0] = self.next(int(tokens[0, 0]), len(ids) + i)[None].float().cpu()
            return last[0]

        def ready(i: int, tokens: list[int]):
            sync(self.device)
            times.append(time.perf_counter() - t0)
            if on_token is not None:
                on_token(tokens[0], last[0][0])

        [out] = decode(
            last[0], step, max_new_tokens, how.temperature, how.top_k, how.top_p, eos_id, stop, gen, on_token=ready
        )
        stopped = len(out) < max_new_tokens or (stop is not None and bool(out) and stop(out))
        return Completion(out, times, "stop" if stopped else "length")

    def check(self, model: nn.Module, prompts: list[list[int]] = ((1, 2, 3),), n_tokens: int = 16) -> None:
        """Raise unless this decoder's greedy tokens equal eager generation's for every prompt (``generate``; where
        the decoder itself is the server's engine, the server checks it through its decode loop as well)."""
        for p in prompts:
            expected = generate(model, [list(p)], n_tokens)[0]
            got = self.generate(list(p), SamplingParams(n_tokens)).tokens
            if got != expected:
                first = next(
                    (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                    min(len(got), len(expected)),
                )
                raise ValueError(f"{self.name} differs from eager greedy decoding at new token {first}")


def own_view(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares every tensor with it (parameters, buffers and any tensor held
    as an attribute: no weight is copied), for one engine to keep its KV cache in: engines of one model (torch
    and compile, a server's batch, a latency timing) each decode in their own view, so none reads, writes or
    swaps another's cache. Written by hand: a deep copy told to keep the tensors (``memo``) is the whole trick."""
    memo: dict[int, object] = {}
    for module in model.modules():
        tensors = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
        memo.update({id(t): t for t in tensors if isinstance(t, torch.Tensor)})
    return copy.deepcopy(model, memo)


class TorchDecoder(Decoder):
    """Eager PyTorch or the decode step under torch.compile. ``start``/``next`` (one prompt's ids in, logits out)
    are built on ``fill``/``advance``, which take and return tensors on the device with no host sync: a batch
    of equal-length prompts decoded together (what eval/latency.py times for a model with a growing cache)."""

    def __init__(self, model: nn.Module, device: torch.device, compiled: bool = False):
        super().__init__(model.params.max_seq_len, device)
        self.model, self.static = model, capabilities(model).static_cache
        if compiled:
            require(model, "static_cache", "the compile engine (one graph for every decode step)")
        self.name = "compile" if compiled else "torch"
        self.note = "torch.compile of the decode step, static KV cache" if compiled else "eager PyTorch"
        self.decode_step = compiled_fn(decode_one_token, "compile" if compiled else "eager", device)
        # the engine's own view of the model, holding its own cache: this project's kept while its size holds,
        # a Hugging Face model's made fresh per prompt (models/hf.py)
        self.view = own_view(model)
        self.cache_shape: tuple[int, int] | None = None

    def cache_len(self) -> int:
        """The KV cache a request needs, rounded up to a multiple of CACHE_BLOCK: a cache of the whole context
        would be read by every step's attention (1024 positions of 4 blocks at dim 256: 8 MB per token on a
        CPU whose weights are 21 MB), and one size per block keeps the compiled step's graphs few."""
        return min(self.max_seq_len, -(-self.need // CACHE_BLOCK) * CACHE_BLOCK)

    def fill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prompts (B, T) on the device into a fresh cache of ``cache_len()`` positions; (B, V) logits of their
        next tokens, on the device."""
        rows, size = tokens.shape[0], self.cache_len()
        # transformers' cache grows: a fresh one for each prompt; this project's is kept while the size holds
        # (entries past the prompt are masked until written; the compiled step keeps its graph)
        if not self.static or self.cache_shape != (rows, size):
            self.view.setup_caches(rows, size)
            self.cache_shape = (rows, size)
        return prefill(self.view, tokens, torch.arange(tokens.shape[1], device=self.device))

    def advance(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each row's next token (B, 1) at ``positions`` (from ``positions``) -> (B, V) logits, on the device."""
        return self.decode_step(self.view, tokens, positions)

    def positions(self, pos: int) -> torch.Tensor:
        """The positions ``advance`` takes when every row is at ``pos``."""
        return torch.tensor([pos], device=self.device)

    def release(self) -> None:
        self.view.clear_caches()
        self.cache_shape = None

    def start(self, ids):
        return self.fill(torch.tensor([ids], device=self.device))[0]

    def next(self, token, pos):
        return self.advance(torch.tensor([[token]], device=self.device), self.positions(pos))[0]


class CachedStep(nn.Module):
    """The model's forward with its KV cache as inputs and outputs (for export): the cache buffers are set to
    copies of the inputs, the forward writes the new keys and values into them, and they are returned."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *caches: torch.Tensor):
        layers = self.model.layers
        for i, layer in enumerate(layers):
            layer.attention.kv_cache.k_cache = caches[i].clone()
            layer.attention.kv_cache.v_cache = caches[len(layers) + i].clone()
        logits = self.model(tokens, input_pos)[:, -1]  # (1, V): only the last position is needed
        ks = [layer.attention.kv_cache.k_cache for layer in layers]
        vs = [layer.attention.kv_cache.v_cache for layer in layers]
        return (logits, *ks, *vs)


def export_onnx(model: nn.Module, folder: Path) -> tuple[Path, list[str], list[tuple[int, ...]]]:
    """``CachedStep`` of ``model`` (float32, CPU) as an ONNX file in ``folder``; its cache input names and
    shapes."""
    require(model, "export", "ONNX/OpenVINO decoding")
    model = model.float().cpu().eval()
    S = model.params.max_seq_len
    model.setup_caches(1, S)
    caches = [layer.attention.kv_cache.k_cache.clone() for layer in model.layers]
    caches += [layer.attention.kv_cache.v_cache.clone() for layer in model.layers]
    n = len(model.layers)
    names = [f"k{i}" for i in range(n)] + [f"v{i}" for i in range(n)]
    t = torch.export.Dim("t", min=1, max=S)
    path = to_onnx(
        CachedStep(model),
        (torch.zeros(1, 4, dtype=torch.long), torch.arange(4), *caches),
        {"tokens": {1: t}, "input_pos": {0: t}, "caches": (None,) * len(caches)},
        ["tokens", "input_pos", *names],
        ["logits", *[f"{c}_out" for c in names]],
        folder / "decode.onnx",
    )
    model.clear_caches()
    return path, names, [tuple(c.shape) for c in caches]


class ArrayDecoder(Decoder):
    """Decoding with an exported step that takes and returns numpy arrays (ONNX Runtime, OpenVINO)."""

    def __init__(self, run, names: list[str], shapes: list[tuple[int, ...]], max_seq_len: int, device):
        super().__init__(max_seq_len, device)
        self.run, self.names, self.shapes = run, names, shapes
        self.caches: list[np.ndarray] = []
        self.threads: int | None = None  # CPU threads of the runtime, as the runtime reports them

    def _step(self, ids: list[int], first: int) -> torch.Tensor:
        feeds = {
            "tokens": np.asarray([ids], dtype=np.int64),
            "input_pos": np.arange(first, first + len(ids), dtype=np.int64),
            **dict(zip(self.names, self.caches, strict=True)),
        }
        out = self.run(feeds)
        self.caches = list(out[1:])
        return torch.from_numpy(np.asarray(out[0][0]))

    def start(self, ids):
        self.caches = [np.zeros(s, dtype=np.float32) for s in self.shapes]
        return self._step(ids, 0)

    def next(self, token, pos):
        return self._step([token], pos)


def onnxruntime_decoder(path: Path, names, shapes, max_seq_len: int, device: torch.device) -> ArrayDecoder:
    session = ort_session(path, device)
    dec = ArrayDecoder(lambda feeds: session.run(None, feeds), names, shapes, max_seq_len, torch.device("cpu"))
    dec.name, dec.threads = "onnxruntime", session.get_session_options().intra_op_num_threads
    dec.note = (
        f"ONNX Runtime, {session.get_providers()[0]}, {dec.threads} CPU thread(s), KV cache as inputs/outputs "
        "(numpy in and out)"
    )
    return dec


def openvino_decoder(path: Path, names, shapes, max_seq_len: int) -> ArrayDecoder:
    import openvino as ov

    # the process's one thread setting, as torch's
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    outputs = compiled.outputs

    def run(feeds):
        result = compiled(feeds)
        return [result[o] for o in outputs]

    dec = ArrayDecoder(run, names, shapes, max_seq_len, torch.device("cpu"))
    dec.name, dec.threads = "openvino", int(compiled.get_property("INFERENCE_NUM_THREADS"))
    version = ov.get_version().split("-")[0]
    dec.note = f"OpenVINO {version} on the CPU, {dec.threads} thread(s), KV cache as inputs/outputs"
    return dec


def build_decoder(name: str, model: nn.Module, device: torch.device, workdir: Path | None = None) -> Decoder:
    """The ``name`` engine for ``model`` (ONNX and OpenVINO export a float32 CPU copy into ``workdir``)."""
    if name not in DECODE_ENGINES:
        raise UserError(f"unknown engine {name!r}; use one of {DECODE_ENGINES}")
    if name in ("torch", "compile"):
        return TorchDecoder(model, device, compiled=name == "compile")
    # One export per model, found again by the model's checksum: another model's graph in the same work folder
    # (serve_compare's default) must never decode this one.
    folder = model_folder(Path(workdir or tempfile.mkdtemp(prefix="decode-")), model)
    meta = folder / "decode.json"
    if meta.is_file():  # exported already for the other engine
        path, d = folder / "decode.onnx", json.loads(meta.read_text())
        names, shapes = d["names"], [tuple(x) for x in d["shapes"]]
    else:
        path, names, shapes = export_onnx(copy.deepcopy(model), folder)
        meta.write_text(json.dumps({"names": names, "shapes": shapes}))
    if name == "onnxruntime":
        return onnxruntime_decoder(path, names, shapes, model.params.max_seq_len, device)
    return openvino_decoder(path, names, shapes, model.params.max_seq_len)
