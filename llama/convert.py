"""Export a model to the Hugging Face transformers Llama format (a complete model folder: config, weights,
generation config, tokenizer) and import one.

    python -m llama.convert export checkpoints/<run>/step_N  hf_out/
    python -m llama.convert import hf_dir/  our_model/

Meta rotates consecutive pairs of each head's dimensions; HF rotates the two halves. The two layouts differ
by a permutation of the rows of wq and wk (the same one HF's convert_llama_weights_to_hf.py applies).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from common.cli import UserError, parse_args, positional, run_main
from common.files import atomic_dir, check_replaceable
from llama.model import ModelArgs, Transformer
from llama.model_io import TOKENIZER_FILE, load_model, resolve_checkpoint, save_model
from llama.tokenizer import BOS_ID, EOS_ID

# our name -> HF name, for every layer; the attention projections of q and k are also permuted
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _name_pairs(a: ModelArgs):
    """(our name, HF's name, heads of a q/k projection whose rows are permuted, else 0) of every tensor."""
    for ours, theirs in _TOP_NAMES.items():
        if not (ours == "output.weight" and a.tie_embeddings):  # HF ties lm_head to embed_tokens itself
            yield ours, theirs, 0
    for i in range(a.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            heads = {"attention.wq.weight": a.n_heads, "attention.wk.weight": a.kv_heads(i)}.get(ours, 0)
            yield f"layers.{i}.{ours}", f"model.layers.{i}.{theirs}", heads


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs (0,1),(2,3).. to halves (0..D/2),(D/2..D)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf(model: Transformer) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, HF state dict) for a plain Llama-2 model."""
    a = model.params
    if a.head_layer is not None:
        raise UserError("per-head layers have no equivalent in HF Llama; only baseline models can be exported")
    if a.attn_gate is not None:
        raise UserError("gated attention has no equivalent in HF Llama; only baseline models can be exported")
    if a.head_norm:
        raise UserError("per-head RMSNorm has no equivalent in HF Llama; only baseline models can be exported")
    if any(x is not None for x in (a.layer_n_heads, a.layer_n_kv_heads, a.layer_ffn_hidden_dim)):
        raise UserError("HF Llama has one size for every layer; a structurally pruned model cannot be exported")
    sd = model.state_dict()
    out = {theirs: meta_to_hf_rows(sd[ours], h) if h else sd[ours] for ours, theirs, h in _name_pairs(a)}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": a.vocab_size,
        "hidden_size": a.dim,
        "intermediate_size": a.ffn_hidden_dim,
        "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.kv_heads(0),
        "head_dim": a.head_dim,
        "max_position_embeddings": a.max_seq_len,
        "rms_norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "tie_word_embeddings": a.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    return config, out


def export_hf(model: Transformer, out_dir: str | Path, tokenizer: Path | None = None) -> Path:
    """A Hugging Face Llama folder: config.json, model.safetensors, generation_config.json and, given this
    project's ``tokenizer`` (its tokenizer.model), tokenizer files that AutoTokenizer loads and that give this
    project's token ids, <s> included (hf_tokenizer), plus the tokenizer.model itself for importing back."""
    config, sd = to_hf(model)
    with atomic_dir(out_dir, owner="llama.convert export") as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if tokenizer is not None:
            hf_tokenizer(tokenizer).save_pretrained(str(tmp))
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return Path(out_dir)


def hf_tokenizer(model_file: Path):
    """This project's SentencePiece model as transformers' LlamaTokenizer (tokenizers backend, converted from
    the .model file by transformers itself) with this project's conventions: no space prepended, <s> before
    every text, and "<s>"/"</s>"/"<unk>" written in a text tokenized as text (split_special_tokens), as
    SentencePiece does. One difference remains: SentencePiece reads a literal U+2581 as a space, which
    this project's tokenizer avoids by encoding it as bytes (llama/tokenizer.py); the export reads it as a space."""
    import tempfile

    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as d:  # transformers converts a folder's tokenizer.model
        shutil.copyfile(model_file, Path(d) / TOKENIZER_FILE)
        return LlamaTokenizer.from_pretrained(
            d, add_prefix_space=False, add_bos_token=True, add_eos_token=False, split_special_tokens=True
        )


def args_from_hf_config(cfg: dict) -> ModelArgs:
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError("HF config uses an activation or biases that Llama-2 does not have; cannot import")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, dim // heads):
        raise UserError(f"HF config head_dim={cfg['head_dim']} differs from hidden_size/heads; cannot import")
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if scaling.get("rope_type", "default") != "default":
        raise UserError(f"HF config uses rope_type={scaling['rope_type']!r}; only plain RoPE is supported")
    # Reproduce intermediate_size exactly: with multiple_of = I the rounding lands on I (see ffn_hidden_dim).
    inter = cfg["intermediate_size"]
    base = int(2 * 4 * dim / 3)
    args = ModelArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        vocab_size=cfg["vocab_size"],
        multiple_of=inter,
        ffn_dim_multiplier=None if base <= inter else inter / base,
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta),
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    assert args.ffn_hidden_dim == inter, (args.ffn_hidden_dim, inter)
    return args


def from_hf(config: dict, hf_sd: dict[str, torch.Tensor]) -> Transformer:
    args = args_from_hf_config(config)
    sd = {ours: hf_to_meta_rows(hf_sd[theirs], h) if h else hf_sd[theirs] for ours, theirs, h in _name_pairs(args)}
    from llama.model_io import model_from_state_dict

    return model_from_state_dict(args, sd, "HF checkpoint")


def import_hf(hf_dir: str | Path) -> Transformer:
    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json; point at a folder saved by save_pretrained()")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d} has no .safetensors weights; re-save the model with safe_serialization")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return from_hf(json.loads((d / "config.json").read_text()), sd)


def import_tokenizer(hf_dir: str | Path) -> Path | None:
    """The SentencePiece model a Llama folder carries (an export of this project's, Meta's Llama-2), if any."""
    path = Path(hf_dir) / TOKENIZER_FILE
    return path if path.is_file() else None


@dataclass
class Args:
    direction: Literal["export", "import"] = positional()  # export: ours -> HF; import: HF -> ours
    source: str = positional()  # export: a checkpoint or model folder; import: an HF Llama folder
    target: str = positional()  # the folder to write
    overwrite: bool = False  # replace an earlier output of the same direction in target


def main(argv: list[str] | None = None):
    a = parse_args(Args(), argv)
    owner = f"llama.convert {a.direction}"
    check_replaceable(a.target, owner, "target", overwrite=a.overwrite)  # before any work
    if a.direction == "export":
        source = resolve_checkpoint(a.source)
        tokenizer = source / TOKENIZER_FILE if (source / TOKENIZER_FILE).is_file() else None
        out = export_hf(load_model(source), a.target, tokenizer)
        print(f"exported {source} ({source.name} of {source.parent.name}) as a Hugging Face Llama folder -> {out}")
    else:
        out = save_model(import_hf(a.source), a.target, import_tokenizer(a.source), owner=owner)
        print(f"imported {a.source} -> {out}")


if __name__ == "__main__":
    run_main(main)
