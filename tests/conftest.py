import pytest
import torch

from data.config import DataConfig
from data.prepare import load_documents
from llama.model import HeadLayerArgs, ModelArgs
from llama.tokenizer import train_tokenizer
from training.config import OptimConfig, TrainConfig

# One intra-op thread in every test, whatever OMP_NUM_THREADS says: results then do not depend on how a
# machine splits reductions across threads, and a loaded 2-core machine is not oversubscribed. Assertions
# are still written to hold under any summation order (tolerances, aggregates over draws).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """A test not marked ``cuda`` sees the machine CI has, a CPU, on a GPU machine too: "auto" would otherwise
    pick the GPU and compare bf16 results with CPU references, or refuse CPU-only schemes. Child processes get
    no visible GPU either. The ``cuda`` tests are the ones that exercise the GPU paths."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, stdlib_docs):
    """(folder of 80 standard-library files, data cache folder) shared by the tests that train."""
    root = tmp_path_factory.mktemp("corpus")
    for d in stdlib_docs[:80]:
        p = root / d.name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(d.text, encoding="utf-8")
    return root, tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def make_config(corpus):
    """Factory for a seconds-long CPU training config writing under ``tmp_path``; keywords override fields."""
    folder, cache = corpus

    def make(tmp_path, **overrides) -> TrainConfig:
        cfg = TrainConfig(
            name="t",
            model=ModelArgs(dim=32, n_layers=2, n_heads=4, multiple_of=16, max_seq_len=32, head_layer=HeadLayerArgs()),
            data=DataConfig(corpus=str(folder), vocab_size=500, cache_dir=str(cache)),
            optim=OptimConfig(lr=1e-2, warmup_steps=2),
            max_steps=8,
            batch_size=4,
            seq_len=32,
            eval_interval=4,
            eval_iters=2,
            log_interval=1,
            ckpt_interval=2,
            keep_last=2,
            keep_every=4,
            device="cpu",
            out_dir=str(tmp_path / "ckpt"),
            log_dir=str(tmp_path / "logs"),
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg

    return make


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, make_config):
    """A per-head model trained for 30 steps, with its run folder: checkpoints/t/step_30."""
    from training.trainer import train

    root = tmp_path_factory.mktemp("trained")
    train(make_config(root, max_steps=30, ckpt_interval=30, eval_interval=30))
    return root / "ckpt" / "t"


@pytest.fixture(scope="session")
def sandbox():
    """The HumanEval sandbox as probed from inside; tests that execute generated code skip, with bubblewrap's
    own reason, where it cannot be made (CI installs it, so there they run)."""
    from eval.sandbox import SandboxUnavailable, sandbox_info

    try:
        return sandbox_info()
    except SandboxUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """A random-weight Hugging Face folder of each supported architecture, with a tokenizer trained here."""
    from tests.hf_models import ARCHITECTURES, make_hf_model

    root = tmp_path_factory.mktemp("hf")
    return {arch: make_hf_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def trained_baseline(tmp_path_factory, make_config):
    """A plain Llama (no per-head layers) trained for 30 steps, context 64: what llama.convert can export."""
    from training.trainer import train

    root = tmp_path_factory.mktemp("baseline")
    model = ModelArgs(dim=32, n_layers=2, n_heads=4, multiple_of=16, max_seq_len=64)
    train(make_config(root, model=model, seq_len=64, max_steps=30, ckpt_interval=30, eval_interval=30))
    return root / "ckpt" / "t"
