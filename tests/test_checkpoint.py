import pytest
import torch

from llama.model import Transformer
from llama.model_io import load_model, resolve_checkpoint, save_model


@pytest.mark.parametrize("tied", [False, True])
def test_model_round_trip(tmp_path, tiny_perhead_args, tied):
    tiny_perhead_args.tie_embeddings = tied
    model = Transformer(tiny_perhead_args)
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.params == model.params
    x = torch.randint(0, 97, (1, 5))
    torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)
    if tied:
        assert back.output.weight is back.tok_embeddings.weight


def test_run_folder_resolves_latest_step(tmp_path, tiny_args):
    for step in (5, 20, 10):
        save_model(Transformer(tiny_args), tmp_path / f"step_{step}")
    assert resolve_checkpoint(tmp_path).name == "step_20"


def test_bad_checkpoints(tmp_path, tiny_args):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no step_N checkpoints"):
        load_model(tmp_path / "empty")
    save_model(Transformer(tiny_args), tmp_path / "m")
    args = (tmp_path / "m" / "model_args.json").read_text().replace('"dim": 64', '"dim": 32')
    (tmp_path / "m" / "model_args.json").write_text(args)
    with pytest.raises(ValueError, match="has shape"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="damaged"):
        load_model(tmp_path / "m")


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, tiny_args, monkeypatch):
    import llama.model_io as ck

    model = Transformer(tiny_args)
    save_model(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(Transformer(tiny_args), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind
