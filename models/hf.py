"""Hugging Face causal LMs behind the interface the evaluators and compressors use for this project's models.

A model folder written by ``save_pretrained`` (``config.json`` + safetensors + tokenizer files) loads with
``AutoModelForCausalLM`` and ``AutoTokenizer``; ``HFModel`` gives it what the evaluators read off a
``Transformer``: ``params`` (n_layers, vocab_size, max_seq_len), ``layers``, ``tok_embeddings``, and a
``forward(tokens, input_pos, mask)`` that uses a KV cache after ``setup_caches``, so ``llama.generation``,
the latency code and the calibration code run on it unchanged. ``HFTokenizer`` (models/hf_tokenizer.py) does
the same for the tokenizer. The model's own code (transformers) computes every forward pass: nothing here
re-implements an architecture.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.cli import UserError
from models.hf_tokenizer import HFTokenizer, why_failed

# model_type -> where the decoder blocks are; the architectures tested here
SUPPORTED = {
    "llama": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "gpt2": "transformer.h",
    "starcoder2": "model.layers",
}
CONFIG_FILE = "config.json"
# linear layers whose sizes differ from the config after structured pruning (compress/structured_hf.py)
SHAPES_FILE, PRUNED_WEIGHTS = "pruned_shapes.json", "pruned.safetensors"


def from_hub(name: str | os.PathLike) -> Path | None:
    """A Hub name (``EleutherAI/pythia-160m``) that is not a local path: the local copy of its files,
    downloaded where the network allows (huggingface_hub's cache). None for anything that is not such a name."""
    text = str(name)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or Path(text.split("/")[0]).exists():
        return None  # not org/name, or a path under a local folder (checkpoints/<run>)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown name, gated model: one line
        raise UserError(
            f"{text} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}); download it where the network allows and pass the folder"
        ) from None


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder written by transformers' ``save_pretrained`` (this project's folders hold model_args.json)."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and not (p / "model_args.json").is_file()


def hf_model_type(folder: str | os.PathLike) -> str:
    """The folder's ``model_type``, after checking that it is one this code handles."""
    return hf_config(folder)["model_type"]


def hf_config(folder: str | os.PathLike) -> dict:
    """config.json as a dict, checked before anything is built from it: a supported ``model_type`` and sizes
    that are positive whole numbers (a string or a float would make transformers fail deep inside)."""
    path = Path(folder) / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a JSON model config ({type(e).__name__}); the folder is damaged") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object; the folder is damaged")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(
            f"{folder} is a {model_type!r} model; supported Hugging Face architectures: {', '.join(SUPPORTED)}"
        )
    for key in SIZE_KEYS:
        value = cfg.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise UserError(f"{path}: {key} = {value!r}; a size must be a positive whole number (no quotes)")
    return cfg


SIZE_KEYS = (  # the sizes of the four architectures' configs (GPT-2 has its own names)
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "n_inner",
)


def weight_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in the folder's safetensors files, read from their headers only (nothing
    is allocated): a damaged, empty or foreign file is a one-line error here, before any model is built.
    Only safetensors are read: a pickle (pytorch_model.bin) can run code when loaded."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (it holds {', '.join(pickles)}: pickles, which this project does not load)" if pickles else ""
        raise UserError(
            f"{folder} has no .safetensors weights{hint}; save the model with save_pretrained(safe_serialization=True)"
        )
    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as st:
                for name in st.keys():
                    shapes[name] = tuple(st.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({str(e)[:100]}); the folder is damaged") from None
    return shapes


def check_weights_fit(folder: Path, cfg: dict, shapes: dict[str, tuple[int, ...]]):
    """Before a model is built from ``cfg``: its depth must be the weights' depth (a config claiming more blocks
    than the files hold would get random ones), and the float32 weights must fit in the memory available."""
    prefix = re.escape(SUPPORTED[cfg["model_type"]]) + r"\.(\d+)\."
    blocks = {int(m.group(1)) for name in shapes if (m := re.search(prefix, name))}
    depth = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    if depth != len(blocks):
        raise UserError(
            f"{folder / CONFIG_FILE} says {depth} blocks, but the weights hold {len(blocks)}; the folder is damaged "
            "or its config.json belongs to another model"
        )
    need = 4 * sum(int(np.prod(s)) for s in shapes.values())
    available = available_memory()
    if available is not None and need > available:
        raise UserError(
            f"{folder}: the weights need {need / 2**30:.1f} GiB in float32, {available / 2**30:.1f} GiB of memory "
            "is available; use a machine with more memory"
        )


def available_memory() -> int | None:
    """Bytes of memory available to allocate (Linux's MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


@dataclass
class HFParams:
    """The model facts evaluators read (``Transformer.params`` has the same names)."""

    n_layers: int
    vocab_size: int
    max_seq_len: int
    model_type: str
    head_layer: None = None  # no per-head layers in an external model

    def head_layer_spec(self) -> None:
        return None  # plain blocks (ModelArgs.head_layer_spec describes this project's richer ones)


class HFModel(nn.Module):
    """A transformers causal LM with this project's model interface."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        # transformers renamed past_key_values to cache (5.x); both are accepted here
        self._cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        self.cache = None
        self.conv1d_names = conv1d_to_linear(hf)  # GPT-2's Conv1D layers, now nn.Linear (stored back on save)

    @property
    def params(self) -> HFParams:
        c = self.hf.config
        return HFParams(
            n_layers=c.num_hidden_layers,
            vocab_size=c.vocab_size,
            max_seq_len=getattr(c, "max_position_embeddings", None) or c.n_positions,
            model_type=c.model_type,
        )

    @property
    def family(self) -> str:  # its definition (what it can do, its layout): models.families.FAMILIES
        return self.hf.config.model_type

    def head_counts(self, block: int) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim) as the config says (transformers infers them from the
        projections after structured pruning)."""
        cfg = self.hf.config
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        return n_heads, n_kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads

    def keep_blocks(self, keep: list[int]):
        """Keep only the decoder blocks ``keep`` (in place), and the config's record of them."""
        kept = nn.ModuleList([self.layers[i] for i in keep])
        for new_index, layer in enumerate(kept):
            for m in layer.modules():  # each attention finds its slot in the KV cache by its layer index
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new_index
        self.hf.set_submodule(self.blocks_path, kept)
        cfg = self.hf.config
        cfg.num_hidden_layers = len(keep)
        if getattr(cfg, "layer_types", None):  # per-layer attention kinds (sliding or full)
            cfg.layer_types = [cfg.layer_types[i] for i in keep]

    @property
    def blocks_path(self) -> str:
        return SUPPORTED[self.hf.config.model_type]

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.get_submodule(self.blocks_path)

    @property
    def tok_embeddings(self) -> nn.Embedding:
        return self.hf.get_input_embeddings()

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None):
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.hf.config)

    def cropping_cache_layers(self) -> list[str]:
        """The kinds of this model's cache layers that crop keys by position (a sliding window), sorted; empty
        for a model whose every layer keeps all its keys. Rows aligned at their right end (a continuous batch)
        or several sequences packed in one row (the lm-eval adapter) would break such a layer."""
        from transformers import DynamicCache

        kinds = {type(layer).__name__ for layer in DynamicCache(config=self.hf.config).layers}
        return sorted(kinds - {"DynamicLayer"})

    def additive_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean 4-D mask (True where a query may attend) as transformers' eager attention takes one as it is:
        added to the scores, 0 or the dtype's lowest value, in the model's dtype."""
        dtype = self.hf.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def clear_caches(self):
        self.cache = None

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
    ):
        """(B, T) tokens -> (B, T, V) logits. Without a cache: a full causal forward, or with ``input_pos`` (B, T)
        and ``mask`` (B, 1, T, T), True where a query may attend, each row's own positions and attention (this
        project's forward takes the same: several sequences packed in one row). With a cache: ``tokens`` sit at
        positions ``input_pos`` (T,); ``mask`` (B, 1, T, cache_len), from ``llama.generation.padding_mask``,
        marks left padding, which becomes transformers' 2-D attention mask and per-row position ids (as its
        own ``generate`` does: positions count from each row's first real token). ``last_only``: the last
        position's logits alone, (B, 1, V) (transformers' ``logits_to_keep=1``); ``keep``, a (B, T) boolean: the
        logits of its True positions alone, (N, V) in row order (``logits_to_keep`` as a mask)."""
        kept = {"logits_to_keep": 1} if last_only else {} if keep is None else {"logits_to_keep": keep}
        if self.cache is None and mask is None:
            return self.hf(input_ids=tokens, use_cache=False, **kept).logits
        if self.cache is None:  # transformers takes a 4-D mask as given
            additive = self.additive_mask(mask)
            positions = input_pos if input_pos.dim() == 2 else input_pos[None].expand(tokens.shape[0], -1)
            return self.hf(
                input_ids=tokens, attention_mask=additive, position_ids=positions, use_cache=False, **kept
            ).logits
        B = tokens.shape[0]
        end = int(input_pos[-1]) + 1
        if mask is None:
            attention, positions = None, input_pos[None].expand(B, -1)
        else:
            keys = mask[:, 0, -1, :end]  # (B, end): what the last (never a padding) query may attend to
            first_valid = keys.int().argmax(-1)
            attention, positions = keys.long(), (input_pos[None] - first_valid[:, None]).clamp(min=0)
        out = self.hf(
            input_ids=tokens,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: self.cache},
            **kept,
        )
        return out.logits


# ---------------------------------------------------------------------------------------------------------
# GPT-2's Conv1D: a linear layer with its weight stored transposed (in, out). It becomes nn.Linear on load, so
# pruning and quantization see one kind of layer, and is stored back as Conv1D on save.


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers Conv1D by the equal nn.Linear; returns the names replaced."""
    from transformers.pytorch_utils import Conv1D

    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            nx, nf = module.weight.shape
            lin = nn.Linear(
                nx, nf, bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype
            )
            lin.weight.data.copy_(module.weight.data.T)
            if module.bias is not None:
                lin.bias.data.copy_(module.bias.data)
            model.set_submodule(name, lin)
            names.append(name)
    return names


def hf_state_dict(model: HFModel) -> dict[str, torch.Tensor]:
    """The transformers state dict of ``model.hf`` as its own class stores it (Conv1D weights transposed back)."""
    sd = {k: v.contiguous() for k, v in model.hf.state_dict().items()}
    for name in model.conv1d_names:
        key = f"{name}.weight"
        if key in sd:
            sd[key] = sd[key].T.contiguous()
    return sd


# ---------------------------------------------------------------------------------------------------------
# Loading and saving


def load_hf(folder: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[HFModel, HFTokenizer]:
    """The model (float32, eval mode) and tokenizer of a transformers model folder. Every weight the model has
    must come from the folder, and nothing in the folder may be left over: transformers would initialise a
    missing one at random (and only print a report), so figures would change from run to run."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    cfg = hf_config(folder)
    pruned = (folder / SHAPES_FILE).is_file()
    check_weights_fit(folder, cfg, weight_shapes(folder))
    try:
        if pruned:
            hf = _load_pruned(folder)
        else:
            hf, info = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, trust_remote_code=False, output_loading_info=True
            )
            problems = {
                "missing": sorted(info["missing_keys"]),
                "unexpected": sorted(info["unexpected_keys"]),
                "wrong shape": sorted(str(k) for k in info.get("mismatched_keys", ())),
            }
            if any(problems.values()):
                listed = "; ".join(f"{what} {_names(keys)}" for what, keys in problems.items() if keys)
                raise UserError(
                    f"{folder}: the weights do not match config.json: {listed} (a damaged folder, or a config.json "
                    "of another model)"
                )
    except UserError:
        raise
    except Exception as e:  # transformers and safetensors raise many kinds for a damaged folder
        raise UserError(f"{folder}: the model does not load ({why_failed(e)})") from None
    model = HFModel(hf.to(device).eval())
    tok = HFTokenizer(folder)
    if tok.vocab_size > model.params.vocab_size:
        raise UserError(f"{folder}: tokenizer has {tok.vocab_size} tokens, the model only {model.params.vocab_size}")
    return model, tok


def _names(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _from_config(folder: Path) -> nn.Module:
    """The folder's model built from its config (random weights), the layers named in pruned_shapes.json (if
    any) rebuilt at their sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    shapes = json.loads((folder / SHAPES_FILE).read_text()) if (folder / SHAPES_FILE).is_file() else {}
    for name, (out_features, in_features) in shapes.items():
        old = hf.get_submodule(name)
        hf.set_submodule(name, nn.Linear(in_features, out_features, bias=old.bias is not None))
    return hf


def _load_pruned(folder: Path) -> nn.Module:
    """A structurally pruned model: built from its config at its sizes, then its weights loaded (safetensors
    checks every name and shape)."""
    from safetensors.torch import load_model

    hf = _from_config(folder)
    load_model(hf, str(folder / PRUNED_WEIGHTS))
    return hf


def hf_skeleton(folder: Path) -> tuple[HFModel, HFTokenizer]:
    """The folder's model at its sizes, with random weights (built on the CPU: transformers computes buffers
    such as rotary frequencies at init), and its tokenizer: what stored quantized weights go into."""
    hf_config(folder)  # one line for a damaged or foreign config
    try:
        model = HFModel(_from_config(folder).eval())
    except Exception as e:
        raise UserError(f"{folder}: the model does not build from its config ({why_failed(e)})") from None
    return model, HFTokenizer(folder)


def save_hf(model: HFModel, tokenizer: HFTokenizer, out: Path):
    """``save_pretrained`` of the model and its tokenizer into ``out``. Layers whose sizes the config cannot say
    (structured pruning left blocks of different sizes) go to pruned_shapes.json, and the weights under the
    model's own names, for ``_load_pruned``."""
    from safetensors.torch import save_model

    shapes = pruned_shapes(model)
    if shapes:
        model.hf.config.save_pretrained(str(out))
        save_model(model.hf, str(out / PRUNED_WEIGHTS))
        (out / SHAPES_FILE).write_text(json.dumps(shapes, indent=2))
    else:
        model.hf.save_pretrained(str(out), state_dict=hf_state_dict(model))
    tokenizer.tok.save_pretrained(str(out))


def pruned_shapes(model: HFModel) -> dict[str, list[int]]:
    """{name: [out_features, in_features]} of every linear layer whose size differs from what the config
    implies (for ``pruned_shapes.json``; empty for a model of the config's own sizes)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(model.hf.config)
    conv1d = set(model.conv1d_names)  # GPT-2's, nn.Linear here and Conv1D (transposed) in the reference
    ref = dict(reference.named_modules())
    out = {}
    for name, m in model.hf.named_modules():
        if isinstance(m, nn.Linear) and name in ref and name not in conv1d:
            if tuple(m.weight.shape) != tuple(ref[name].weight.shape):
                out[name] = [m.out_features, m.in_features]
    return out
