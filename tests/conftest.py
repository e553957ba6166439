import pytest
import torch

from llama.model import HeadLayerArgs, ModelArgs
from llama.tokenizer import train_tokenizer
from training.config import DataConfig
from training.data import load_documents


@pytest.fixture
def tiny_args():
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=64)


@pytest.fixture
def tiny_perhead_args(tiny_args):
    tiny_args.head_layer = HeadLayerArgs(hidden_dim=24, activation="gelu")
    return tiny_args


@pytest.fixture(scope="session")
def stdlib_docs():
    return load_documents(DataConfig())


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, stdlib_docs):
    """A 1000-token BPE trained on a slice of the default corpus (a few seconds)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer((d.text for d in stdlib_docs[::7]), path, vocab_size=1000, max_chars=3_000_000)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
