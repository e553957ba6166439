import dataclasses

import pytest
import torch

from llama.model import (
    HeadLayerArgs,
    ModelArgs,
    PerHeadLayer,
    Transformer,
    apply_rotary_emb,
    count_params,
    flops_per_token,
    rope_cos_sin,
)


def expected_param_count(a: ModelArgs) -> int:
    hd, hidden = a.dim // a.n_heads, a.ffn_hidden_dim
    attn = a.dim * a.n_heads * hd * 2 + a.dim * a.kv_heads(0) * hd * 2
    ffn = 3 * a.dim * hidden
    head = 0 if a.head_layer is None else 2 * a.n_heads * hd * (a.head_layer.hidden_dim or hd)
    per_layer = attn + ffn + head + 2 * a.dim  # + two RMSNorm weights
    emb = a.vocab_size * a.dim
    return emb + a.n_layers * per_layer + a.dim + (0 if a.tie_embeddings else emb)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("perhead", [False, True])
def test_shapes_and_param_count(tiny_args, tied, perhead):
    tiny_args.tie_embeddings = tied
    if perhead:
        tiny_args.head_layer = HeadLayerArgs(hidden_dim=24)
    model = Transformer(tiny_args)
    logits = model(torch.randint(0, 97, (3, 11)))
    assert logits.shape == (3, 11, 97)
    counts = count_params(model)
    assert counts["total"] == expected_param_count(tiny_args)
    assert counts["non_embedding"] == counts["total"] - 97 * 64


def test_llama2_7b_param_count():
    a = ModelArgs()  # the defaults are Llama-2 7B: 6,738,415,616 parameters (Touvron et al., 2023)
    assert a.ffn_hidden_dim == 11008
    assert expected_param_count(a) == 6_738_415_616


def test_100m_configs_are_about_100m():
    for n_layers in (5, 8):
        a = ModelArgs(dim=768, n_layers=n_layers, n_heads=12, vocab_size=32000, max_seq_len=1024)
        assert 80e6 < expected_param_count(a) < 115e6


def test_flops_per_token_counts_every_matmul(tiny_perhead_args):
    a = tiny_perhead_args
    model = Transformer(a)
    norm_params = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    matmul_params = count_params(model)["non_embedding"] - norm_params
    assert flops_per_token(a, 64) == 6 * matmul_params + 12 * a.n_layers * a.dim * 64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=65, n_heads=4), "not divisible by n_heads"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
        (dict(dim=12, n_heads=4), "must be even"),
        (dict(n_layers=0), "must be positive"),
    ],
)
def test_bad_model_args(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**kwargs)


def test_unknown_model_keys_and_round_trip(tiny_perhead_args):
    saved = dataclasses.asdict(tiny_perhead_args)
    assert ModelArgs(**saved) == tiny_perhead_args  # checkpoints rebuild args this way
    with pytest.raises(ValueError, match="unknown model argument.*'n_layer'"):
        ModelArgs.from_dict({**saved, "n_layer": 3})
    with pytest.raises(ValueError, match="activation='tanh' is unknown"):
        HeadLayerArgs(activation="tanh")


def test_rope_matches_hf():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half  # noqa: F401

    B, T, H, D = 2, 9, 3, 16
    x = torch.randn(B, T, H, D)
    pos = torch.arange(5, 5 + T)
    ours = apply_rotary_emb(x, rope_cos_sin(pos, D, 10000.0))
    # HF rotates the two halves of each head; Meta rotates consecutive pairs: permute into HF's layout.
    to_hf = lambda t: t.reshape(B, T, H, D // 2, 2).transpose(-1, -2).reshape(B, T, H, D)  # noqa: E731
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    freqs = pos.float()[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    q_hf, _ = apply_rotary_pos_emb(to_hf(x), to_hf(x), emb.cos()[None], emb.sin()[None], unsqueeze_dim=2)
    torch.testing.assert_close(to_hf(ours), q_hf, atol=1e-6, rtol=1e-5)


def test_rope_angles_stay_float32_in_bf16_model(tiny_args):
    model = Transformer(tiny_args).to(torch.bfloat16)
    cs = rope_cos_sin(torch.arange(1000, 1001), tiny_args.head_dim, tiny_args.rope_theta)
    assert cs.dtype == torch.float32
    assert model(torch.randint(0, 97, (1, 8))).dtype == torch.bfloat16


@pytest.mark.parametrize("perhead", [False, True])
def test_kv_cache_decoding_equals_full_forward(tiny_args, perhead):
    if perhead:
        tiny_args.head_layer = HeadLayerArgs()
    model = Transformer(tiny_args).eval()
    if perhead:  # non-zero W2 so the per-head path is really exercised
        for layer in model.layers:
            torch.nn.init.normal_(layer.attention.head_layer.w2, std=0.1)
    prompt, n_new = torch.randint(0, 97, (2, 7)), 12
    # greedy decoding without a cache: the whole sequence through the model each step
    seq = prompt
    full_logits = []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(seq)[:, -1]
            full_logits.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        # the same with the KV cache: one prefill then one token at a time
        model.setup_caches(2, 32)
        logits = model(prompt, torch.arange(7))[:, -1]
        cached_logits, tokens = [logits], [logits.argmax(-1)]
        for i in range(n_new - 1):
            logits = model(tokens[-1][:, None], torch.tensor([7 + i]))[:, -1]
            cached_logits.append(logits)
            tokens.append(logits.argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), seq[:, 7:])
    torch.testing.assert_close(torch.stack(cached_logits), torch.stack(full_logits), atol=1e-5, rtol=1e-5)


def test_forward_with_cache_needs_positions(tiny_args):
    model = Transformer(tiny_args)
    model.setup_caches(1, 16)
    with pytest.raises(ValueError, match="pass input_pos"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_perhead_off_is_plain_llama_and_on_starts_equal(tiny_args):
    base = Transformer(tiny_args)
    assert not any("head_layer" in k for k in base.state_dict())
    per_args = dataclasses.replace(tiny_args, head_layer=HeadLayerArgs(hidden_dim=16))
    per = Transformer(per_args)
    missing, unexpected = per.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and all("head_layer" in k for k in missing) and len(missing) == 2 * 2
    x = torch.randint(0, 97, (2, 10))
    # zero-initialised W2 with the residual: exactly the baseline at the start
    torch.testing.assert_close(per(x), base(x), atol=0, rtol=0)
    # one optimizer step moves W2 off zero, and then the outputs differ
    opt = torch.optim.SGD(per.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(per(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    assert per.layers[0].attention.head_layer.w2.grad.abs().sum() > 0
    opt.step()
    assert (per(x) - base(x)).abs().max() > 1e-4


def test_perhead_without_residual_changes_outputs_from_the_start(tiny_args):
    base = Transformer(tiny_args)
    per = Transformer(dataclasses.replace(tiny_args, head_layer=HeadLayerArgs(residual=False)))
    per.load_state_dict(base.state_dict(), strict=False)
    x = torch.randint(0, 97, (1, 6))
    assert (per(x) - base(x)).abs().max() > 1e-4


@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_perhead_layer_equals_a_loop_over_heads(act):
    H, Dh, Dm = 5, 8, 6
    layer = PerHeadLayer(H, Dh, Dm, HeadLayerArgs(hidden_dim=Dm, activation=act))
    torch.nn.init.normal_(layer.w2)
    o = torch.randn(2, 3, H, Dh)
    f = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.relu}[act]
    ref = torch.stack([o[:, :, h] + f(o[:, :, h] @ layer.w1[h]) @ layer.w2[h] for h in range(H)], dim=2)
    torch.testing.assert_close(layer(o), ref, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads(tiny_args):
    # GQA with n_kv_heads=2 equals multi-head attention whose K/V weights repeat each kv head n_rep times.
    gqa = Transformer(tiny_args)
    mha = Transformer(dataclasses.replace(tiny_args, n_kv_heads=4))
    sd = gqa.state_dict()
    for k in list(sd):
        if k.endswith(("wk.weight", "wv.weight")):
            sd[k] = sd[k].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_rope_eager_and_compiled_forms_agree():
    from llama.model import _rotate_real, apply_rotary_emb, rope_cos_sin

    x = torch.randn(2, 9, 4, 16, dtype=torch.float64).float()
    cs = rope_cos_sin(torch.arange(3, 12), 16, 10000.0)
    torch.testing.assert_close(apply_rotary_emb(x, cs), _rotate_real(x, cs), atol=1e-6, rtol=1e-6)
    # a rotation keeps each pair's length
    torch.testing.assert_close(apply_rotary_emb(x, cs).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
