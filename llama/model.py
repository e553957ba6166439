"""Llama-2 (Touvron et al., 2023) with optional richer heads: per-head layers, gated attention and per-head
RMSNorm (the near-free control).

Reads top to bottom like the paper: ModelArgs -> RMSNorm -> RoPE -> Attention (+ output gate, + per-head norm,
+ per-head layers) -> FeedForward -> TransformerBlock -> Transformer. With ``ModelArgs.head_layer = None``,
``ModelArgs.attn_gate = None`` and ``ModelArgs.head_norm = False`` the module tree, the parameter names and the
outputs are exactly Llama-2's (Meta's names, so checkpoints map one to one).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from common.cli import UserError

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
# Gated attention (Qiu et al., 2025): the gate's width per head. "elementwise" (their best variant, G1) gates
# every channel of a head's output, "headwise" one scalar per head.
ATTN_GATES = ("elementwise", "headwise")


@dataclass
class HeadLayerArgs:
    hidden_dim: int | None = None  # Dm, hidden size of each head's MLP; None means head_dim
    activation: str = "silu"  # one of ACTIVATIONS
    residual: bool = True  # o_h + W2 act(W1 o_h); W2 then starts at zero so training starts from plain Llama
    init_std: float | None = None  # std of W1's initial weights; None: head_dim**-0.5 (variance-preserving)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise UserError(f"head_layer.activation={self.activation!r} is unknown; use one of {sorted(ACTIVATIONS)}")
        if self.hidden_dim is not None and self.hidden_dim <= 0:
            raise UserError(f"head_layer.hidden_dim={self.hidden_dim} must be positive (or None for head_dim)")
        if self.init_std is not None and not 0 < self.init_std < 10:  # "not" also rejects NaN
            raise UserError(f"head_layer.init_std={self.init_std} must be in (0, 10) (or None: head_dim**-0.5)")


@dataclass
class ModelArgs:
    dim: int = 4096  # model width
    n_layers: int = 32  # number of transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None means n_heads (plain multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # scales the SwiGLU hidden size (Llama-2 70B uses 1.3)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # longest context trained on; the KV cache may be set up shorter
    tie_embeddings: bool = False  # share tok_embeddings and output weights (Llama-2 does not)
    head_layer: HeadLayerArgs | None = None  # per-head layers; None is plain Llama-2
    attn_gate: str | None = None  # gated attention (Qiu et al., 2025): elementwise or headwise; None is plain Llama-2
    head_norm: bool = False  # RMSNorm on each head's attention output before wo (Qiu et al.'s near-free control)
    # Per-layer sizes, set by structured pruning (compress/prune.py); None = the same in every layer.
    layer_n_heads: list[int] | None = None  # query heads of each layer (head_dim stays dim // n_heads)
    layer_n_kv_heads: list[int] | None = None  # key/value heads of each layer
    layer_ffn_hidden_dim: list[int] | None = None  # SwiGLU hidden size of each layer

    def __post_init__(self):
        # A checkpoint stores asdict(args); rebuilding with ModelArgs(**saved) hands head_layer back as a dict.
        if isinstance(self.head_layer, dict):
            self.head_layer = HeadLayerArgs(**self.head_layer)
        # n_kv_heads stays None when unset (it then follows n_heads, resolved by kv_heads): a value filled in
        # here would go stale when --n-heads is overridden later
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                raise UserError(f"model {name}={getattr(self, name)} must be positive")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            raise UserError(f"model n_kv_heads={self.n_kv_heads} must be positive (or None: n_heads)")
        if self.dim % self.n_heads:
            raise UserError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; choose n_heads dividing dim")
        if self.n_heads % self.kv_heads(0) and self.layer_n_heads is None:
            raise UserError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "choose n_kv_heads dividing n_heads"
            )
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} (dim/n_heads) must be even for RoPE")
        if self.attn_gate is not None and self.attn_gate not in ATTN_GATES:
            raise UserError(f"attn_gate={self.attn_gate!r} is unknown; use one of {list(ATTN_GATES)} (or None: off)")
        for name in ("layer_n_heads", "layer_n_kv_heads", "layer_ffn_hidden_dim"):
            sizes = getattr(self, name)
            if sizes is not None and (len(sizes) != self.n_layers or min(sizes) <= 0):
                raise UserError(f"{name} needs {self.n_layers} positive sizes (one per layer), got {sizes}")
        for i in range(self.n_layers):
            if self.heads(i) % self.kv_heads(i):
                raise UserError(f"layer {i}: {self.heads(i)} query heads do not split into {self.kv_heads(i)} groups")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:  # query heads per key/value head
        return self.n_heads // self.kv_heads(0)

    @property
    def ffn_hidden_dim(self) -> int:
        # Llama's SwiGLU sizing: 2/3 of 4*dim keeps the parameter count of a 4*dim GELU MLP (Shazeer, 2020).
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def heads(self, layer: int) -> int:
        return self.n_heads if self.layer_n_heads is None else self.layer_n_heads[layer]

    def kv_heads(self, layer: int) -> int:
        if self.layer_n_kv_heads is not None:
            return self.layer_n_kv_heads[layer]
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def ffn_dim(self, layer: int) -> int:
        return self.ffn_hidden_dim if self.layer_ffn_hidden_dim is None else self.layer_ffn_hidden_dim[layer]

    @property
    def head_layer_dim(self) -> int:
        hl = self.head_layer
        return 0 if hl is None else (hl.hidden_dim or self.head_dim)

    def gate_width(self, n_heads: int) -> int:
        """Outputs of the gate projection ``wg`` for a layer of ``n_heads`` heads (0 without a gate)."""
        return {None: 0, "elementwise": n_heads * self.head_dim, "headwise": n_heads}[self.attn_gate]

    def head_layer_spec(self) -> dict | None:
        """The richer heads as results record them (None: plain Llama blocks): the per-head layers' settings, the
        hidden size resolved, and the attention gate. Two variants (hidden 64 vs 256, SiLU vs GELU, a gate) are
        two different models in every table and report."""
        hl, spec = self.head_layer, {}
        if hl is not None:
            spec = {"hidden_dim": self.head_layer_dim, "activation": hl.activation, "residual": hl.residual}
        if hl is not None and hl.init_std is not None:
            spec["init_std"] = hl.init_std
        if self.attn_gate is not None:
            spec["gate"] = self.attn_gate
        if self.head_norm:
            spec["head_norm"] = True
        return spec or None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model argument(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in float32 as Meta's Llama does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32, back to x's dtype, then the gain: Meta's order of operations,
        # in PyTorch's fused kernel (twice as fast on a CPU as the same arithmetic op by op)
        return F.rms_norm(x.float(), self.weight.shape, None, self.eps).type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotation angles for RoPE (Su et al., 2021), (T, head_dim/2, 2) as [cos, sin] in float32; positions
    (B, T), one row per sequence (a batch whose sequences sit at different positions), give (B, T, head_dim/2, 2).

    Computed from the positions on every call instead of kept as a buffer, so casting the model to bf16
    never rounds the angles (a bf16 angle at position 1000 is off by several radians).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary_emb(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by position-dependent angles (Meta's layout).

    Eagerly as Meta's code does it, one complex multiplication per pair (about 5x faster forward and backward
    on a CPU than four real products); under torch.compile in the real-valued form, which Inductor fuses
    (it does not generate code for complex numbers). Both compute the same products.
    """
    if torch.compiler.is_compiling():
        return _rotate_real(x, cos_sin)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, D/2)
    # cos + i sin, (T, 1, D/2) or (B, T, 1, D/2): broadcast over the heads (and over the batch when shared)
    rot = torch.view_as_complex(cos_sin.contiguous()).unsqueeze(-2)
    return torch.view_as_real(xc * rot).flatten(3).type_as(x)


def _rotate_real(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    B, T, H, D = x.shape
    xp = x.float().reshape(B, T, H, D // 2, 2)
    cs = cos_sin.view(-1, T, 1, D // 2, 2)  # one row for all sequences, or one per sequence
    cos, sin = cs[..., 0], cs[..., 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin, xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """Keys and values of past positions, written in place at ``input_pos`` (static shapes for compile):
    positions (T,) shared by the batch's rows, or (B, T), each row at its own positions (continuous batching:
    sequences that joined at different times)."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B = k.shape[0]  # (B, n_kv_heads, T, head_dim)
        if input_pos.dim() == 1:
            self.k_cache[:B, :, input_pos] = k.to(self.k_cache.dtype)
            self.v_cache[:B, :, input_pos] = v.to(self.v_cache.dtype)
        else:  # row b's tokens at its own positions: indexed (B, T), the heads' slice lands last but one
            rows = torch.arange(B, device=k.device)[:, None]
            self.k_cache[rows, :, input_pos] = k.transpose(1, 2).to(self.k_cache.dtype)
            self.v_cache[rows, :, input_pos] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache[:B], self.v_cache[:B]


class PerHeadLayer(nn.Module):
    """A small MLP on each attention head's output, before the heads are concatenated.

    o_h <- o_h + W2_h act(W1_h o_h), with W1 (H, Dh, Dm) and W2 (H, Dm, Dh) stacked over heads and applied
    with one batched einsum, never a loop over heads.
    """

    def __init__(self, n_heads: int, head_dim: int, hidden_dim: int, args: HeadLayerArgs):
        super().__init__()
        self.act = ACTIVATIONS[args.activation]
        self.residual = args.residual
        # Variance-preserving init for W1 unless init_std says otherwise (0.02 is every other matrix's: a large
        # hidden layer at head_dim**-0.5 starts with outputs far larger than the rest of the block's). With the
        # residual, a zero W2 makes the block start as plain Llama (like LoRA's zero B); without it W2 must
        # carry the signal from the first step.
        std = head_dim**-0.5 if args.init_std is None else args.init_std
        self.w1 = nn.Parameter(torch.randn(n_heads, head_dim, hidden_dim) * std)
        w2 = torch.zeros(n_heads, hidden_dim, head_dim)
        if not self.residual:
            w2.normal_(0.0, hidden_dim**-0.5)
        self.w2 = nn.Parameter(w2)

    def forward(self, o: torch.Tensor) -> torch.Tensor:  # o: (B, T, H, Dh)
        h = self.act(torch.einsum("bthd,hdm->bthm", o, self.w1))  # (B, T, H, Dm)
        out = torch.einsum("bthm,hmd->bthd", h, self.w2)  # (B, T, H, Dh)
        return o + out if self.residual else out


class HeadNorm(nn.Module):
    """RMSNorm over each head's attention output, with a gain per head and channel: Qiu et al. (2025) report that
    this near-free change gets most of the output gate's gain, so any richer head is measured against it. The
    gains are stored flat (H * Dh, head by head, as wo's input columns), a vector like every norm's gain, so the
    optimizer leaves them undecayed."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads * head_dim))

    def forward(self, o: torch.Tensor) -> torch.Tensor:  # o: (B, T, H, Dh)
        normed = F.rms_norm(o.float(), o.shape[-1:], None, self.eps).type_as(o)
        return normed * self.weight.view(-1, o.shape[-1])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.heads(layer_id), args.kv_heads(layer_id), args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        # The gate reads the block's normalised input x (Qiu et al.'s G1: query-dependent, after SDPA); a plain
        # Llama attention has no wg at all, so its state dict stays Meta's.
        self.wg = nn.Linear(args.dim, args.gate_width(self.n_heads), bias=False) if args.attn_gate else None
        self.head_norm = HeadNorm(self.n_heads, self.head_dim, args.norm_eps) if args.head_norm else None
        self.head_layer = None
        if args.head_layer is not None:
            self.head_layer = PerHeadLayer(self.n_heads, self.head_dim, args.head_layer_dim, args.head_layer)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos_sin, mask, input_pos):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, cos_sin), apply_rotary_emb(k, cos_sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv_heads, cache_len, head_dim)
            k, v = k.to(q.dtype), v.to(q.dtype)
        # Flash / memory-efficient kernels on GPU; GQA shares each K/V head across n_rep query heads.
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads
        )
        o = o.transpose(1, 2)  # (B, T, n_heads, head_dim)
        if self.wg is not None:  # o_h <- o_h * sigmoid(x W_g), per channel (elementwise) or per head (headwise)
            o = o * torch.sigmoid(self.wg(x)).view(B, T, self.n_heads, -1)
        if self.head_norm is not None:
            o = self.head_norm(o)
        if self.head_layer is not None:
            o = self.head_layer(o)
        return self.wo(o.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim(layer_id))
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos_sin, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), cos_sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    family = "perhead-llama"  # its definition (what it can do, its layout): models.families.FAMILIES

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.params = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.causal_mask: torch.Tensor | None = None
        self._init_weights()

    def _init_weights(self):
        # GPT-2 style init for training from scratch: N(0, 0.02), and the projections that write into the
        # residual stream (wo, w2) scaled by 1/sqrt(2 n_layers) so its variance does not grow with depth.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for layer in self.layers:
            for w in (layer.attention.wo.weight, layer.feed_forward.w2.weight):
                nn.init.normal_(w, mean=0.0, std=0.02 / math.sqrt(2 * self.params.n_layers))

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None):
        """Add a KV cache to every attention layer; afterwards ``forward`` needs ``input_pos``."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            kv_heads, head_dim = layer.attention.n_kv_heads, self.params.head_dim
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_len, kv_heads, head_dim, dtype).to(device)
        self.causal_mask = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device))

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = None

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab_size), or (B, 1, vocab_size) with ``last_only``, or (N, vocab_size)
        for the N True positions of a (B, T) boolean ``keep``, in row order (transformers' ``logits_to_keep``).

        ``input_pos`` (T,) are the positions of ``tokens`` (needed with the KV cache), or (B, T) with each row at
        its own positions (the rows of a continuous batch). ``mask`` (B, 1, T, keys),
        True where a query may attend, replaces the causal mask (generation uses it to hide left padding).
        ``last_only`` runs the output projection on the last position alone, all a prefill needs (nanoGPT's
        inference path): the vocabulary projection of a 128-token prompt is 127 rows of wasted work.
        """
        B, T = tokens.shape
        if input_pos is not None and input_pos.dim() == 2 and B == 1:
            # one row at its own positions is the shared case: the plain path, as fast as for any single sequence
            # (the per-row indexing made a batch of one 7-10% slower per token on a 2-core CPU)
            input_pos = input_pos[0]
        if self.causal_mask is not None:
            if input_pos is None:
                raise ValueError("the KV cache is set up: pass input_pos (positions of tokens) to forward")
            if mask is None:  # (1, 1, T, cache_len), or (B, 1, T, cache_len) for positions per row
                mask = self.causal_mask[input_pos][None] if input_pos.dim() == 1 else self.causal_mask[input_pos]
                mask = mask[:, None]
        elif input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        # mask None without a cache: plain causal attention over tokens (is_causal, flash on GPU)
        cos_sin = rope_cos_sin(input_pos, self.params.head_dim, self.params.rope_theta)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos_sin, mask, input_pos)
        if keep is not None:
            return self.output(self.norm(h[keep]))
        return self.output(self.norm(h[:, -1:] if last_only else h))


def count_params(model: Transformer) -> dict:
    """Parameter counts; ``non_embedding`` leaves out the token embedding table (a lookup, not a matmul)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    embedding = model.tok_embeddings.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention scores.

    The PaLM appendix B / nanoGPT convention (6N + 12 L d T), so MFU compares with theirs. Norms, RoPE,
    activations and the softmax are left out; the embedding lookup is not a matmul.
    """
    d, hd = args.dim, args.head_dim
    matmul_params, attention = d * args.vocab_size, 0.0  # output projection
    for i in range(args.n_layers):
        h, kv = args.heads(i), args.kv_heads(i)
        matmul_params += 2 * d * h * hd + 2 * d * kv * hd + 3 * d * args.ffn_dim(i)
        matmul_params += 2 * h * hd * args.head_layer_dim  # per-head W1 and W2
        matmul_params += d * args.gate_width(h)  # the attention gate's projection
        attention += 12.0 * h * hd * seq_len  # QK^T and AV, forward and backward
    return 6.0 * matmul_params + attention
