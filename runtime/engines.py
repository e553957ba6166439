"""Runtime engines: one hierarchy. ``Engine`` is a way to run a model, with a name, a note saying what it is,
and its check against eager PyTorch, which it must pass before it is timed or served (``check``). Three kinds:

- ``ForwardEngine`` (here): the full forward without KV cache (tokens -> logits), exported with a dynamic
  batch and sequence length, checked on fresh inputs of new shapes: torch, torch.compile, torch.export +
  AOTInductor, ONNX Runtime, and TorchScript as a legacy engine;
- ``Slots`` (here): the one decoding interface, sequences in slots of a KV cache (``open``, ``step``,
  ``close``; ``max_batch`` of them at once), what the server's decode loop (runtime/loop.py) runs, checked with
  sequences joining and leaving a full batch against each one's eager greedy decoding alone. Its engines: the
  batching ones of runtime/batching.py (``TorchSlots``, ``HFSlots``), and every ``runtime.decoding.Decoder``
  (torch, compile, ONNX Runtime, OpenVINO: one sequence, ``max_batch`` 1), which also decodes a prompt alone
  (``generate``) and is checked token for token against eager greedy generation as well;
- ``DeviceSteps`` (here): the device-level calls eval/latency.py times (``fill``, ``advance``, ``positions``,
  ``release``), which ``TorchSlots`` and ``TorchDecoder`` give.

- ``aoti``: ``torch.export`` then AOTInductor, PyTorch's recommended way to deploy a model ahead of time
  (a compiled .pt2 package; compiling takes tens of seconds on a CPU).
- ``torchscript``: legacy. ``torch.jit`` is deprecated since torch 2.13; it is kept only to compare with
  studies that used it, is not among the default engines, and its deprecation warnings are silenced here.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from common.cli import UserError
from llama.generation import generate
from llama.model import Transformer
from runtime.export import model_folder, ort_session, to_onnx
from runtime.loop import greedy

ENGINES = ("torch", "compile", "aoti", "onnxruntime", "torchscript")
DEFAULT_ENGINES = ("torch", "compile", "aoti", "onnxruntime")  # torchscript is legacy: ask for it by name


class Engine:
    """One way to run a model (see the module's docstring for the kinds)."""

    name = ""
    note = ""

    def check(self, model: nn.Module, *args, **options):
        """Raise unless this engine computes what eager PyTorch computes for ``model``."""
        raise NotImplementedError


class Slots(Engine):
    """An engine that holds sequences in slots 0..max_batch-1. ``open(slot, ids)`` runs a prompt into a free slot
    and returns the (V,) float32 logits of its next token; ``step(slots, tokens, positions)`` feeds each listed
    slot its next token at its position and returns (len(slots), V) float32 logits; ``close(slot)`` frees a
    slot. An engine that cannot batch has ``max_batch`` 1 and says why in its ``note``."""

    max_batch = 1

    def open(self, slot: int, ids: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def step(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def close(self, slot: int) -> None:
        pass

    def check(self, model: nn.Module, prompts: list[list[int]], n_tokens: int) -> None:
        """Raise unless every prompt decoded inside a batch (filled to ``max_batch``, sequences joining one step
        apart and leaving at different steps) gets exactly the greedy tokens of eager decoding alone, through
        the decode loop the server runs (runtime/loop.py)."""
        fill = [prompts[i % len(prompts)] for i in range(max(len(prompts), self.max_batch + 1))]
        lengths = [max(1, n_tokens - (i % 3)) for i in range(len(fill))]  # leave at different steps
        alone = {i: generate(model, [p], n_tokens)[0] for i, p in enumerate(prompts)}
        got = greedy(self, fill, lengths)
        for i, tokens in enumerate(got):
            if tokens != alone[i % len(prompts)][: lengths[i]]:
                raise ValueError(f"{self.name}: a sequence decoded in a batch differs from greedy decoding alone")


class DeviceSteps(Protocol):
    """The device-level calls of an engine that eval/latency.py times, tensors in and out with no host sync:
    ``fill(tokens (B, T)) -> (B, V)`` logits (prompts into a fresh cache), ``advance(tokens (B, 1), positions)
    -> (B, V)``, ``positions(pos)`` (what ``advance`` takes when every row is at ``pos``), ``release()`` (the
    cache let go)."""

    def fill(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def advance(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def positions(self, pos: int) -> torch.Tensor: ...

    def release(self) -> None: ...


class ForwardEngine(Engine):
    def __init__(self, name: str, run, note: str = ""):
        self.name, self.note = name, note
        self.run = run  # tokens (B, T) long tensor -> logits (B, T, V) tensor on the model's device

    @torch.no_grad()
    def check(self, model: nn.Module, shapes=((1, 7), (3, 12)), atol: float = 1e-4) -> float:
        """Largest |engine - eager| logit difference over inputs of new shapes; raises above ``atol``."""
        device = model.tok_embeddings.weight.device
        worst = 0.0
        for shape in shapes:
            tokens = torch.randint(0, model.params.vocab_size, shape, device=device)
            diff = (self.run(tokens).float() - model(tokens).float()).abs().max().item()
            worst = max(worst, diff)
        if worst > atol:
            raise AssertionError(f"{self.name} differs from eager PyTorch by {worst:.2e} > {atol:.0e}")
        return worst


def torch_engine(model: Transformer) -> ForwardEngine:
    return ForwardEngine("torch", lambda tokens: model(tokens), "eager PyTorch")


def compile_engine(model: Transformer) -> ForwardEngine:
    return ForwardEngine("compile", torch.compile(model, dynamic=True), "torch.compile, dynamic shapes")


def _dynamic_shapes(model: Transformer):
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=max(2, model.params.max_seq_len))
    return ({0: batch, 1: seq},)


def aoti_engine(model: Transformer, example: torch.Tensor, path: str | os.PathLike | None = None) -> ForwardEngine:
    path = Path(path or tempfile.mkdtemp(prefix="aoti-")) / "model.pt2"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(model))
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    runner = torch._inductor.aoti_load_package(package)
    return ForwardEngine("aoti", lambda tokens: runner(tokens), f"torch.export + AOTInductor, {path}")


def torchscript_engine(model: Transformer, example: torch.Tensor) -> ForwardEngine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation, and tracer warnings about shapes (checked below)
        traced = torch.jit.trace(model, (example,), check_trace=False)

    def run(tokens: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return traced(tokens)

    return ForwardEngine("torchscript", run, "legacy: torch.jit.trace (deprecated since torch 2.13)")


def onnxruntime_engine(
    model: Transformer, example: torch.Tensor, path: str | os.PathLike | None = None
) -> ForwardEngine:
    device = example.device
    folder = model_folder(Path(path or tempfile.mkdtemp(prefix="onnx-")), model)
    path = to_onnx(model, (example,), _dynamic_shapes(model), ["tokens"], ["logits"], folder / "forward.onnx")
    session = ort_session(path, device)

    def run(tokens: torch.Tensor) -> torch.Tensor:
        # numpy in and out: on CUDA this includes the host<->device copies, as a plain ORT user would see them
        out = session.run(None, {"tokens": tokens.detach().cpu().numpy().astype(np.int64)})[0]
        return torch.from_numpy(out).to(device)

    threads = session.get_session_options().intra_op_num_threads
    return ForwardEngine(
        "onnxruntime", run, f"{session.get_providers()[0]}, {threads} CPU thread(s), numpy I/O, {path}"
    )


def build(
    name: str, model: Transformer, example: torch.Tensor, workdir: str | os.PathLike | None = None
) -> ForwardEngine:
    """The engine ``name`` for ``model``; exports go under ``workdir`` (the caller removes it; default: a new
    temporary folder). ``example`` only shows the export the input's type: a batch of one would make
    torch.export specialise the batch size to 1 ("Constraints violated (batch)"), so it gets two rows."""
    if example.shape[0] < 2:
        example = example.expand(2, -1).contiguous()
    if name == "torch":
        return torch_engine(model)
    if name == "compile":
        return compile_engine(model)
    if name == "aoti":
        return aoti_engine(model, example, _folder(workdir, name))
    if name == "torchscript":
        return torchscript_engine(model, example)
    if name == "onnxruntime":
        return onnxruntime_engine(model, example, _folder(workdir, name))
    raise UserError(f"unknown engine {name!r}; use one of {ENGINES}")


def _folder(workdir: str | os.PathLike | None, name: str) -> Path | None:
    if workdir is None:
        return None
    (Path(workdir) / name).mkdir(parents=True, exist_ok=True)
    return Path(workdir) / name


def check(engine: Engine, model: nn.Module, *args, **options):
    """The one correctness check of every engine (its own kind's): raises where it differs from eager."""
    return engine.check(model, *args, **options)
