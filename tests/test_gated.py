"""Gated attention (Qiu et al., 2025): off, the model is plain Llama-2 bit for bit; on, it trains, resumes, decodes
on every engine that carries it, compresses where the method applies, and refuses HF export in one line."""

import dataclasses

import pytest
import torch

from common.cli import UserError
from llama.convert import to_hf
from llama.model import Transformer, count_params, flops_per_token
from llama.model_io import load_model
from runtime.decoding import build_decoder
from runtime.engines import check
from training.trainer import train


def test_gate_off_is_plain_llama_bit_for_bit(tiny_args):
    torch.manual_seed(0)
    plain = Transformer(tiny_args)
    torch.manual_seed(0)
    off = Transformer(dataclasses.replace(tiny_args, attn_gate=None))
    assert list(plain.state_dict()) == list(off.state_dict())
    assert not any("wg" in k for k in off.state_dict())
    x = torch.randint(0, 97, (2, 9))
    assert torch.equal(plain(x), off(x))


@pytest.mark.parametrize("gate, width", [("elementwise", 64), ("headwise", 4)])
def test_gate_multiplies_each_heads_output_by_a_sigmoid_of_the_normalised_input(tiny_args, gate, width):
    args = dataclasses.replace(tiny_args, attn_gate=gate)
    model = Transformer(args)
    att = model.layers[0].attention
    assert att.wg.weight.shape == (width, 64)
    assert count_params(model)["total"] == count_params(Transformer(tiny_args))["total"] + 2 * width * 64
    # a gate driven to 1 everywhere leaves attention as it was; the same weights with the gate give other logits
    x = torch.randint(0, 97, (1, 7))
    gated = model(x)
    for layer in model.layers:
        torch.nn.init.zeros_(layer.attention.wg.weight)  # sigmoid(0) = 1/2: each head's output halved
    halved = model(x)
    assert not torch.allclose(gated, halved)
    plain = Transformer(tiny_args)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "wg" not in k})
    for layer in plain.layers:
        layer.attention.wo.weight.data *= 0.5  # o * 1/2 then wo == o then wo / 2
    torch.testing.assert_close(halved, plain(x), rtol=1e-5, atol=1e-5)
    assert flops_per_token(args, 16) == flops_per_token(tiny_args, 16) + 6 * 2 * width * 64


def test_unknown_gate_is_one_clear_error(tiny_args):
    with pytest.raises(UserError, match="attn_gate='sigmoid' is unknown"):
        dataclasses.replace(tiny_args, attn_gate="sigmoid")


def test_gated_model_trains_resumes_and_records_its_gate(tmp_path, make_config):
    cfg = make_config(tmp_path, max_steps=6, ckpt_interval=3)
    cfg.model = dataclasses.replace(cfg.model, head_layer=None, attn_gate="elementwise")
    summary = train(cfg)
    assert summary.head_layer == {"gate": "elementwise"} and summary.per_head is True
    model = load_model(tmp_path / "ckpt/t")
    assert model.params.attn_gate == "elementwise" and model.layers[0].attention.wg is not None
    again = make_config(tmp_path, max_steps=8, ckpt_interval=3, resume=True)
    again.model = dataclasses.replace(again.model, head_layer=None, attn_gate="elementwise")
    assert train(again).steps == 8
    other = make_config(tmp_path, max_steps=9, resume=True)  # the same run without the gate: refused
    other.model = dataclasses.replace(other.model, head_layer=None)
    with pytest.raises(UserError, match="different model"):
        train(other)


@pytest.mark.parametrize("engine", ["torch", "compile", "onnxruntime", "openvino"])
def test_gated_model_decodes_as_eager_greedy_on_every_engine(tiny_args, engine, tmp_path):
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_args, attn_gate="elementwise")).eval()
    decoder = build_decoder(engine, model, torch.device("cpu"), tmp_path)
    check(decoder, model, [[1, 5, 9, 2], [7, 3]], n_tokens=6)  # raises where a token differs


def test_gated_model_prunes_heads_with_its_gate_and_refuses_hf_export(tiny_args):
    from compress.structured import prune_structured

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_args, attn_gate="elementwise")).eval()
    calib = torch.randint(0, 97, (4, 16))
    pruned, report = prune_structured(model, calib, head_ratio=0.5, ffn_ratio=0.0)
    heads = report["layers"][0]["heads"]
    assert heads < 4 and pruned.layers[0].attention.wg.weight.shape == (heads * 16, 64)
    assert pruned(calib).shape == (4, 16, 97)
    with pytest.raises(UserError, match="gated attention has no equivalent in HF Llama"):
        to_hf(Transformer(dataclasses.replace(tiny_args, attn_gate="headwise")))
