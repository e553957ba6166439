"""The project's decode loop against what a user would run instead, side by side on the same weights.

    python -m bench.decode_loop                       # dim 256, 4 blocks, vocab 8000, batch 1, 64 new tokens
    python -m bench.decode_loop --rounds 20 --engines torch compile onnxruntime openvino

One random-weight plain Llama (this project's ``Transformer``) and the same weights as transformers'
``LlamaForCausalLM`` (``llama.convert.to_hf``) generate greedily from the same prompt, timed in one process in
interleaved rounds (the order rotates each round), every engine warmed up first. A request's figure is its
wall-clock time over its new tokens (prompt processing included, the same prompt for all). Each engine is
reported per round and as its ratio to transformers' eager ``generate`` (Wilcoxon signed-rank on the per-round
ratios, with its interval; common.stats.paired_ratio). Targets: eager at or below transformers' eager
(ratio <= 1), compile at most half of it (ratio <= 0.5). Writes bench/results/decode_loop.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.cli import UserError, parse_args, run_main
from common.files import atomic_write
from common.hardware import run_metadata
from common.stats import adjust, paired_ratio
from common.timing import spread
from llama.convert import to_hf
from llama.model import ModelArgs, Transformer
from runtime.decoding import DECODE_ENGINES, build_decoder
from runtime.engines import check
from runtime.sampling import SamplingParams

TARGETS = {"torch": 1.0, "compile": 0.5}  # ratio to transformers' eager generate, at most


def transformers_model(model: Transformer):
    """The same weights as transformers' own Llama, eager, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config, sd = to_hf(model)
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    hf.load_state_dict(sd, strict=not config["tie_word_embeddings"])
    return hf.eval()


def hf_generate(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def run(a) -> dict:
    torch.manual_seed(0)
    args = ModelArgs(
        dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, vocab_size=a.vocab_size, max_seq_len=a.max_seq_len
    )
    model = Transformer(args).eval()
    hf = transformers_model(model)
    prompt = torch.randint(3, a.vocab_size, (a.prompt_len,)).tolist()
    engines = {"transformers": lambda: hf_generate(hf, prompt, a.n_tokens)}
    for name in a.engines:
        decoder = build_decoder(name, model, torch.device("cpu"), Path(a.workdir))
        check(decoder, model, [prompt], 8)
        engines[name] = lambda d=decoder: d.generate(prompt, SamplingParams(a.n_tokens)).tokens
    reference = engines["transformers"]()
    for name, fn in engines.items():  # warm-up (compilation) and the same tokens from every engine
        for _ in range(a.warmup):
            got = fn()
        if got != reference:
            raise UserError(f"{name} generates other tokens than transformers' generate: the comparison is void")
    samples = {name: [] for name in engines}
    names = list(engines)
    for r in range(a.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated: a busy moment hits all alike
            t0 = time.perf_counter()
            engines[name]()
            samples[name].append(1e3 * (time.perf_counter() - t0) / a.n_tokens)
    tests = []
    rows = {}
    for name in names:
        row = {"ms_per_token": spread(samples[name]), "samples": samples[name]}
        if name != "transformers":
            ratio = paired_ratio(samples[name], samples["transformers"]) | {"engine": name}
            tests.append(ratio)
            row["ratio_to_transformers"] = ratio
            if name in TARGETS:  # met by the estimate; shown only where the whole interval is below it
                row["target"] = TARGETS[name]
                row["meets_target"] = ratio["median"] <= TARGETS[name]
                row["shown_below_target"] = ratio["ci_high"] <= TARGETS[name]
        rows[name] = row
    adjust(tests)
    settings = {k: getattr(a, k) for k in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "prompt_len")}
    return {"benchmark": "decode_loop", **settings, "n_tokens": a.n_tokens, "rounds": a.rounds, "engines": rows}


def table(r: dict) -> str:
    out = [
        "| engine | ms/token (median) | p10-p90 | ratio to transformers [95% CI] | target | met (estimate) | "
        "interval below it |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in r["engines"].items():
        s, ratio = row["ms_per_token"], row.get("ratio_to_transformers")
        rtxt = (
            "reference" if ratio is None else f"x{ratio['median']:.3f} [{ratio['ci_low']:.3f}, {ratio['ci_high']:.3f}]"
        )
        target = f"<= {row['target']}" if "target" in row else ""
        meets = ("yes" if row["meets_target"] else "no") if "target" in row else ""
        shown = ("yes" if row["shown_below_target"] else "no") if "target" in row else ""
        out.append(
            f"| {name} | {s['median']:.3f} | {s['p10']:.3f}-{s['p90']:.3f} | {rtxt} | {target} | {meets} | {shown} |"
        )
    return "\n".join(out)


@dataclass
class Args:
    engines: list[str] = field(default_factory=lambda: ["torch", "compile"])  # the project's decode engines
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    vocab_size: int = 8000
    max_seq_len: int = 1024  # the model's context (the KV cache the engines allocate)
    prompt_len: int = 32
    n_tokens: int = 64  # new tokens per request
    rounds: int = 15
    warmup: int = 2
    threads: int | None = None  # torch threads (default: torch's own)
    workdir: str = "results/decode_loop"  # ONNX exports (onnxruntime, openvino)
    out: str = "bench/results/decode_loop.json"

    def __post_init__(self):
        unknown = [e for e in self.engines if e not in DECODE_ENGINES]
        if unknown or self.rounds < 3 or self.n_tokens < 1 or self.warmup < 1:
            raise UserError(f"engines from {DECODE_ENGINES}, --rounds >= 3, --n-tokens and --warmup >= 1")


def main(argv=None):
    a = parse_args(Args(), argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = {**run_metadata("cpu"), **run(a)}
    atomic_write(a.out, json.dumps(result, indent=2))
    print(table(result))
    print(f"-> {a.out}")


if __name__ == "__main__":
    run_main(main)
