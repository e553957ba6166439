"""Quantized and 2:4-sparse kernels against the dense model: each variant's output is checked, then all are
timed side by side.

    python -m bench.compressed_decode     # CUDA: baseline_8_layer in bf16; CPU: tiny_baseline in float32

Every variant is built from the same fresh weights:
- ``dense``: the reference;
- ``2:4 pruned``: magnitude 2:4 masks applied, still dense kernels (what the sparse kernels must reproduce);
- ``2:4 sparse kernels``: the same weights as ``SparseSemiStructuredTensor`` (CUDA: sparse tensor cores);
- one per quantization scheme (default bnb-nf4, bnb-int8, torchao-int8-weight, torchao-int4-weight; on a CPU
  int8-dynamic and torchao-int8-weight).
A variant that cannot be built here (a package missing, no CUDA) is listed with the reason.

Check: logits of every variant on one batch of random tokens against its reference (the dense model; the
2:4-pruned dense model for the sparse kernels): relative error ||out - ref|| / ||ref|| and the share of
positions whose top token agrees. The 2:4 kernels must reproduce their reference to bf16 rounding
(relative error under 1e-2); quantized models are approximations, so their error is reported, with NaN or an
error over 0.5 counted as failed. Latency: per mode and batch size, the variants that passed are decoded in
interleaved rounds in one process (eval.side_by_side): ms per token and the ratio to dense with its 95%
interval; a ratio over 1 (slower) is a result. A variant that fails to decode in a mode is listed with why.
Writes bench/results/compressed_decode.json after every mode and batch size.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from bench.train_throughput import load_config
from common.cli import UserError, failure, parse_args, run_main
from common.device import pick_device
from common.files import atomic_write
from common.hardware import run_metadata
from common.progress import Progress
from compress.prune import block_linears, check_n_m, prune_model
from eval.latency import MODES, decode_run
from eval.side_by_side import Args as SideBySideArgs
from eval.side_by_side import side_by_side
from llama.model import Transformer
from models.interface import state_dict_bytes
from runtime.quantize import SCHEMES, quantize
from runtime.sparse import to_semi_structured

SPARSE_TOLERANCE = 1e-2  # bf16 rounding: the sparse kernels compute the pruned model's function
QUANT_FAIL = 0.5  # a quantized model this far from the dense one is not computing the same function


def build_variants(dense: Transformer, schemes: list[str]) -> tuple[dict, dict, dict]:
    """name -> model, name -> the name of its reference, name -> why it could not be built."""
    models, refs, unavailable = {"dense": dense}, {"dense": "dense"}, {}
    pruned = copy.deepcopy(dense)
    prune_model(pruned, "magnitude", n_m=(2, 4))
    assert all(check_n_m(lin.weight) for layer in pruned.layers for lin in block_linears(layer).values())
    models["2:4 pruned"], refs["2:4 pruned"] = pruned, "dense"
    try:
        sparse = copy.deepcopy(pruned)
        if not to_semi_structured(sparse):
            raise UserError("no linear layer was converted (needs fp16/bf16 weights holding a 2:4 pattern)")
        models["2:4 sparse kernels"], refs["2:4 sparse kernels"] = sparse, "2:4 pruned"
    except Exception as e:  # reported, not hidden
        unavailable["2:4 sparse kernels"] = failure(e)
    for scheme in schemes:
        try:
            models[scheme] = quantize(copy.deepcopy(dense), scheme).eval()
            refs[scheme] = "dense"
        except Exception as e:
            unavailable[scheme] = failure(e)
    return models, refs, unavailable


@torch.no_grad()
def check_outputs(models: dict, refs: dict, tokens: torch.Tensor) -> dict:
    logits = {}
    for name, m in models.items():
        try:
            logits[name] = m(tokens).float()
        except Exception as e:
            logits[name] = failure(e)
    out = {}
    for name in models:
        mine, ref = logits[name], logits[refs[name]]
        if isinstance(mine, str) or isinstance(ref, str):
            out[name] = {"ok": False, "error": mine if isinstance(mine, str) else f"reference failed: {ref}"}
            continue
        rel = float((mine - ref).norm() / ref.norm())
        agree = float((mine.argmax(-1) == ref.argmax(-1)).float().mean())
        bound = SPARSE_TOLERANCE if name == "2:4 sparse kernels" else QUANT_FAIL
        out[name] = {"reference": refs[name], "rel_error": rel, "top1_agreement": agree, "bound": bound}
        out[name]["ok"] = bool(rel == rel and rel <= bound)  # NaN fails
    return out


def decodes(model: Transformer, batch: int, context: int, mode: str) -> str | None:
    """None if ``model`` decodes in ``mode`` (compiling and capturing it), else why not."""
    try:
        run, _ = decode_run(model, batch, context, 2, mode)
        run()
        run()
        return None
    except Exception as e:
        return failure(e)
    finally:
        model.clear_caches()  # the engine's cache, however far it got


def table(result: dict) -> str:
    lines = [
        "| variant | mode | batch | ms/token (median) | p10-p90 | ratio to dense [95% CI] | verdict | rel. error | "
        "top-1 agree | weights MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks, sizes = result["checks"], result["memory_bytes"]
    for name, why in result["unavailable"].items():
        lines.append(f"| {name} | | | unavailable: {why[:80]} | | | | | | |")
    for run in result["timings"]:
        for name, why in run["failed"].items():
            lines.append(f"| {name} | {run['mode']} | {run['batch']} | failed: {why[:80]} | | | | | | |")
        for name, row in run["models"].items():
            d, ratio, c = row["decode_ms_per_token"], row.get("decode_ratio_to_reference"), checks[name]
            ci = (
                "reference"
                if ratio is None
                else f"x{ratio['median']:.3f} [{ratio['ci_low']:.3f}, {ratio['ci_high']:.3f}]"
            )
            verdict = "" if ratio is None else ratio["test"]["verdict"]
            err = f"{c['rel_error']:.2e}" if "rel_error" in c else "-"
            agree = f"{c['top1_agreement']:.3f}" if "top1_agreement" in c else "-"
            lines.append(
                f"| {name} | {run['mode']} | {run['batch']} | {d['median']:.4f} | {d['p10']:.4f}-{d['p90']:.4f} | "
                f"{ci} | {verdict} | {err} | {agree} | {sizes[name] / 1e6:.0f} |"
            )
    return "\n".join(lines)


@dataclass
class Args:
    config: str | None = None  # runner name (default: baseline_8_layer on CUDA, tiny_baseline on CPU)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    schemes: list[Literal[SCHEMES]] | None = None  # default: bnb and torchao on CUDA, int8 on a CPU
    modes: list[Literal[MODES]] | None = None  # default: eager and compile+cudagraphs on CUDA, eager on CPU
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    context: int | None = None  # tokens in the cache (default: max_seq_len / 2)
    n_tokens: int = 32  # decode steps per sample
    rounds: int = 10  # interleaved rounds (samples per variant)
    out: str = "bench/results/compressed_decode.json"  # result JSON


def main(argv=None):
    a = parse_args(Args(), argv)
    device = pick_device(a.device)
    cuda = device.type == "cuda"
    cfg = load_config(a.config or ("baseline_8_layer" if cuda else "tiny_baseline"))
    schemes = a.schemes or (
        ["bnb-nf4", "bnb-int8", "torchao-int8-weight", "torchao-int4-weight"]
        if cuda
        else ["int8-dynamic", "torchao-int8-weight"]
    )
    modes = a.modes or (["eager", "compile+cudagraphs"] if cuda else ["eager"])
    context = a.context or cfg.model.max_seq_len // 2
    torch.manual_seed(0)
    dense = Transformer(cfg.model).to(device=device, dtype=torch.bfloat16 if cuda else torch.float32).eval()
    models, refs, unavailable = build_variants(dense, schemes)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, min(128, cfg.model.max_seq_len)), device=device)
    checks = check_outputs(models, refs, tokens)
    result = {
        **run_metadata(device),
        "benchmark": "compressed_decode",
        "config": cfg.name,
        "dtype": str(dense.tok_embeddings.weight.dtype).removeprefix("torch."),
        "context_len": context,
        "n_tokens": a.n_tokens,
        "rounds": a.rounds,
        "unavailable": unavailable,
        "checks": checks,
        "memory_bytes": {n: state_dict_bytes(m) for n, m in models.items()},
        "timings": [],
    }
    passed = [n for n in models if checks[n]["ok"]]
    for mode in modes:
        for batch in Progress(a.batch_sizes, desc=mode):
            failed = {n: why for n in passed if (why := decodes(models[n], batch, context, mode)) is not None}
            timed = {n: models[n] for n in passed if n not in failed}
            run = {"mode": mode, "batch": batch, "failed": failed, "models": {}}
            if "dense" in timed and len(timed) > 1:
                sbs = SideBySideArgs(
                    reference="dense",
                    rounds=a.rounds,
                    batch=batch,
                    context=context,
                    prompt_len=context,
                    n_tokens=a.n_tokens,
                    mode=mode,
                    energy=False,
                )
                run |= side_by_side(timed, device, sbs, progress=False)
            result["timings"].append(run)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(a.out, json.dumps(result, indent=2))
    print(f"{result['device']}, torch {result['torch_version']}, commit {result['git_commit'][:12]}, {cfg.name}")
    print(table(result))
    print(f"-> {a.out}")


if __name__ == "__main__":
    run_main(main)
