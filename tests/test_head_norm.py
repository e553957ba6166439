"""Per-head RMSNorm (the near-free control of Qiu et al., 2025) and the per-head layers' W1 init: off, the model is
plain Llama-2 bit for bit; on, it normalises each head's output, trains, resumes, decodes on every engine that
carries it, prunes heads with its gains, and refuses HF export in one line."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from common.cli import UserError, apply_overrides
from llama.convert import to_hf
from llama.model import HeadLayerArgs, Transformer, count_params, flops_per_token
from llama.model_io import load_model
from runtime.decoding import build_decoder
from runtime.engines import check
from training.optim import make_optimizer
from training.trainer import train


def test_head_norm_off_is_plain_llama_bit_for_bit(tiny_args):
    torch.manual_seed(0)
    plain = Transformer(tiny_args)
    torch.manual_seed(0)
    off = Transformer(dataclasses.replace(tiny_args, head_norm=False))
    assert list(plain.state_dict()) == list(off.state_dict())
    assert not any("head_norm" in k for k in off.state_dict())
    x = torch.randint(0, 97, (2, 9))
    assert torch.equal(plain(x), off(x))


def test_head_norm_normalises_each_heads_output_with_its_own_gains(tiny_args):
    args = dataclasses.replace(tiny_args, head_norm=True)
    model = Transformer(args).eval()
    att = model.layers[0].attention
    assert att.head_norm.weight.shape == (4 * 16,)  # H * Dh gains, head by head
    assert count_params(model)["total"] == count_params(Transformer(tiny_args))["total"] + 2 * 64
    assert flops_per_token(args, 16) == flops_per_token(tiny_args, 16)  # a norm is not a matmul
    torch.manual_seed(1)
    att.head_norm.weight.data = torch.rand(64) + 0.5
    o = torch.randn(2, 5, 4, 16) * torch.tensor([0.1, 1.0, 10.0, 3.0])[None, None, :, None]
    out = att.head_norm(o)
    # by hand: each head's 16 channels divided by their root mean square, times that head's gains
    rms = o.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(out, o / rms * att.head_norm.weight.view(4, 16))
    # a head's output scaled by any factor leaves the block's output as it was: the norm removes the scale (values
    # made large first, so that the norm's eps is negligible beside their mean square)
    for layer in model.layers:
        layer.attention.wv.weight.data *= 100.0
    x = torch.randint(0, 97, (1, 7))
    base = model(x)
    for layer in model.layers:
        layer.attention.wv.weight.data *= 5.0  # every head's output (a mix of values) scales by 5
    torch.testing.assert_close(model(x), base, rtol=1e-4, atol=1e-4)


def test_head_norm_gains_are_not_decayed(tmp_path, make_config):
    cfg = make_config(tmp_path)
    cfg.model = dataclasses.replace(cfg.model, head_layer=None, head_norm=True)
    model = Transformer(cfg.model)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    gains = {id(layer.attention.head_norm.weight) for layer in model.layers}
    no_decay = next(g for g in opt.param_groups if g["weight_decay"] == 0.0)
    assert gains <= {id(p) for p in no_decay["params"]}


def test_head_norm_and_init_std_are_options_of_every_runner():
    import runners.tiny

    cfg = apply_overrides(runners.tiny.config(), ["--head-norm", "--no-head-layer"])
    assert cfg.model.head_norm and cfg.model.head_layer is None
    cfg = apply_overrides(runners.tiny.config(), ["--hidden-dim", "512", "--init-std", "0.02"])
    assert cfg.model.head_layer == HeadLayerArgs(hidden_dim=512, init_std=0.02)
    with pytest.raises(UserError, match="init_std=-1.0"):
        apply_overrides(runners.tiny.config(), ["--init-std", "-1"])


def test_init_std_sets_w1_and_is_recorded(tiny_args):
    torch.manual_seed(0)
    default = Transformer(dataclasses.replace(tiny_args, head_layer=HeadLayerArgs(hidden_dim=512)))
    torch.manual_seed(0)
    small = Transformer(dataclasses.replace(tiny_args, head_layer=HeadLayerArgs(hidden_dim=512, init_std=0.02)))
    w_default, w_small = default.layers[0].attention.head_layer.w1, small.layers[0].attention.head_layer.w1
    # 4 x 16 x 512 = 32,768 draws each: the sample std is within 2% of the asked one
    assert abs(w_default.std().item() / 16**-0.5 - 1) < 0.02
    assert abs(w_small.std().item() / 0.02 - 1) < 0.02
    assert torch.equal(small.layers[0].attention.head_layer.w2, torch.zeros(4, 512, 16))  # still starts as plain
    assert small.params.head_layer_spec()["init_std"] == 0.02
    assert "init_std" not in default.params.head_layer_spec()  # the default init stays as recorded before


def test_head_norm_model_trains_resumes_and_records_it(tmp_path, make_config):
    cfg = make_config(tmp_path, max_steps=6, ckpt_interval=3)
    cfg.model = dataclasses.replace(cfg.model, head_layer=None, head_norm=True)
    summary = train(cfg)
    assert summary.head_layer == {"head_norm": True} and summary.per_head is True
    model = load_model(tmp_path / "ckpt/t")
    assert model.params.head_norm and model.layers[0].attention.head_norm is not None
    again = make_config(tmp_path, max_steps=8, ckpt_interval=3, resume=True)
    again.model = dataclasses.replace(again.model, head_layer=None, head_norm=True)
    assert train(again).steps == 8
    other = make_config(tmp_path, max_steps=9, resume=True)  # the same run without the norm: refused
    other.model = dataclasses.replace(other.model, head_layer=None)
    with pytest.raises(UserError, match="different model"):
        train(other)


@pytest.mark.parametrize("engine", ["torch", "compile", "onnxruntime", "openvino"])
def test_head_norm_model_decodes_as_eager_greedy_on_every_engine(tiny_args, engine, tmp_path):
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_args, head_norm=True)).eval()
    for layer in model.layers:  # gains away from 1, so an engine that dropped the norm would differ
        layer.attention.head_norm.weight.data = torch.rand(64) * 2
    decoder = build_decoder(engine, model, torch.device("cpu"), tmp_path)
    check(decoder, model, [[1, 5, 9, 2], [7, 3]], n_tokens=6)  # raises where a token differs


def test_head_norm_model_prunes_heads_with_its_gains_and_refuses_hf_export(tiny_args):
    from compress.structured import prune_structured

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_args, head_norm=True)).eval()
    for layer in model.layers:
        layer.attention.head_norm.weight.data = torch.arange(64, dtype=torch.float32)  # gain = its flat index
    calib = torch.randint(0, 97, (4, 16))
    pruned, report = prune_structured(model, calib, head_ratio=0.5, ffn_ratio=0.0)
    heads = report["layers"][0]["heads"]
    gains = pruned.layers[0].attention.head_norm.weight
    assert heads < 4 and gains.shape == (heads * 16,)
    # the kept gains are whole heads, in order: each block of 16 is one head's channels 16h .. 16h + 15
    blocks = gains.view(heads, 16)
    assert all(torch.equal(b - b[0], torch.arange(16.0)) and b[0] % 16 == 0 for b in blocks)
    assert pruned(calib).shape == (4, 16, 97)
    with pytest.raises(UserError, match="per-head RMSNorm has no equivalent in HF Llama"):
        to_hf(Transformer(dataclasses.replace(tiny_args, head_norm=True)))


def test_rms_norm_reference_is_torchs():
    # the by-hand check above and F.rms_norm agree: the norm is the one every RMSNorm of the model uses
    o = torch.randn(3, 16)
    torch.testing.assert_close(F.rms_norm(o, (16,), None, 1e-5), o / o.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())
