import pytest
import torch

from llama.convert import export_hf, import_hf
from llama.model import ModelArgs, Transformer

transformers = pytest.importorskip("transformers")


def hf_tiny(tied: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; random norms make the test see a swapped norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_import_from_hf_matches_logits(tmp_path, tied):
    hf = hf_tiny(tied)
    hf.save_pretrained(tmp_path)
    ours = import_hf(tmp_path).eval()
    assert ours.params.ffn_hidden_dim == 176 and ours.params.n_kv_heads == 2
    x = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_export_to_hf_matches_logits(tmp_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=32, max_seq_len=64)
    ours = Transformer(args).eval()
    with torch.no_grad():
        for layer in ours.layers:
            layer.attention_norm.weight.normal_(1.0, 0.1)
    export_hf(ours, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(import_hf(tmp_path).state_dict(), ours.state_dict(), atol=0, rtol=0)


def test_perhead_models_refuse_export(tmp_path, tiny_perhead_args):
    with pytest.raises(ValueError, match="per-head layers have no equivalent"):
        export_hf(Transformer(tiny_perhead_args), tmp_path)


def test_import_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf(tmp_path)
