"""Hugging Face model folders through the evaluators, the compressors and the lm-eval adapter, on tiny
random-weight models of each supported architecture (tests/hf_models.py), offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.config import DataConfig
from eval.model import load_for_eval
from eval.perplexity import document_nll, evaluate_perplexity
from llama.generation import generate
from models.hf import load_hf
from models.layout import block_linears, check_n_m
from tests.hf_models import ARCHITECTURES, write_local_tasks

TEXT = "def añadir(x):\n    return x + 1  # ünïcode ✓\n\nprint(añadir(41))\n"


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (root / f"m{i}.py").write_text(TEXT * (i + 2))
    return root


def direct_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """Logits straight from transformers, without this project's code."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_and_perplexity_equal_a_direct_computation(hf_models, text_corpus, arch):
    ev = load_for_eval(hf_models[arch], "cpu")
    assert ev.architecture == arch and ev.model.params.n_layers == 3
    r = evaluate_perplexity(ev, DataConfig(corpus=str(text_corpus)), 128, 64, 4, 100, progress=False)
    ids = ev.tokenizer.encode_batch([p.read_text() for p in sorted(text_corpus.glob("*.py"))], bos=True, eos=True)
    stream = np.concatenate(ids)[:100].tolist()  # one window: every target scored from the stream start
    logits = direct_logits(hf_models[arch], stream[:-1])
    nll = F.cross_entropy(logits, torch.tensor(stream[1:]), reduction="sum").item()
    assert r["tokens_scored"] == 99
    assert r["nll_sum"] == pytest.approx(nll, rel=1e-5)
    # bits per byte counts the UTF-8 bytes of the scored tokens
    assert r["bytes_scored"] == int(ev.tokenizer.token_bytes()[stream[1:]].sum())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lm_eval_mode_scores_a_document_after_the_prefix_token(hf_models, arch):
    ev = load_for_eval(hf_models[arch], "cpu")
    doc = ev.tokenizer.encode(TEXT, bos=False)
    [nll] = document_nll(ev.model, [np.asarray(doc)], ev.tokenizer.bos_id, 128)
    logits = direct_logits(hf_models[arch], [ev.tokenizer.bos_id, *doc[:-1]])
    assert nll == pytest.approx(F.cross_entropy(logits, torch.tensor(doc), reduction="sum").item(), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_token_bytes_add_up_to_the_text(hf_models, arch):
    _, tok = load_hf(hf_models[arch])
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert tok.decode(ids) == TEXT
    assert int(tok.token_bytes()[ids].sum()) == len(TEXT.encode("utf-8"))  # BOS/EOS count no bytes


def test_bos_follows_the_tokenizer_convention(hf_models):
    _, llama_tok = load_hf(hf_models["llama"])
    _, gpt2_tok = load_hf(hf_models["gpt2"])
    assert llama_tok.encode("x")[0] == llama_tok.bos_id != llama_tok.eos_id  # Llama adds <s>
    assert gpt2_tok.encode("x") == gpt2_tok.encode("x", bos=False)  # GPT-2 adds nothing
    assert gpt2_tok.bos_id == gpt2_tok.eos_id  # documents are scored after <|endoftext|>, as lm-eval does


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_generation_equals_transformers_greedy_generate(hf_models, arch):
    from transformers import AutoModelForCausalLM

    model, tok = load_hf(hf_models[arch])
    prompts = [tok.encode("def f(x):"), tok.encode("import os\nimport sys\nx = [1, 2")]
    batched = generate(model, prompts, 6)  # left-padded together: positions and masks must follow
    hf = AutoModelForCausalLM.from_pretrained(str(hf_models[arch]), dtype=torch.float32).eval()
    for p, got in zip(prompts, batched, strict=True):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_id)
        expected = ref[0, len(p) :].tolist()
        if tok.eos_id in expected:  # generate() here stops before EOS
            expected = expected[: expected.index(tok.eos_id)]
        assert got == expected


def test_unsupported_architecture_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model; supported .*llama, gpt_neox, gpt2, starcoder2"):
        load_for_eval(tmp_path, "cpu")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON model config"):
        load_for_eval(tmp_path, "cpu")


def test_hf_model_without_corpus_asks_for_one(hf_models):
    ev = load_for_eval(hf_models["gpt2"], "cpu")
    with pytest.raises(FileNotFoundError, match="pass --corpus"):
        evaluate_perplexity(ev, None, 64, 32, 4, 100, progress=False)


# ---------------------------------------------------------------------------------------------------------
# Compression of HF folders, through compress's command line


def _compress(base: Path, out: Path, *args: str) -> Path:
    from compress.__main__ import main

    calib = [
        "--calib-corpus",
        "stdlib",
        "--calib-file-glob",
        "json/*.py",
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "64",
    ]
    return main(["--checkpoint", str(base), "--out", str(out), *args, *calib])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "method", [("wanda", "--sparsity", "0.5"), ("sparsegpt", "--pattern", "2:4"), ("magnitude", "--sparsity", "0.3")]
)
def test_pruning_hits_its_sparsity_and_keeps_shapes(hf_models, tmp_path, arch, method):
    out = _compress(hf_models[arch], tmp_path / "c", "--method", *method)
    info = json.loads((out / "compression.json").read_text())
    ev = load_for_eval(out, "cpu")
    lins = [lin for layer in ev.model.layers for lin in block_linears(layer).values()]
    assert lins and ev.model.params.n_layers == 3
    if method[1] == "--pattern":
        assert all(check_n_m(lin.weight) for lin in lins)
    else:
        target = float(method[2])
        zeros = sum(int((lin.weight == 0).sum()) for lin in lins) / sum(lin.weight.numel() for lin in lins)
        assert zeros == pytest.approx(target, abs=0.01)
        assert info["report"]["linear_sparsity"] == pytest.approx(zeros, abs=1e-6)
    ids = torch.tensor([ev.tokenizer.encode(TEXT)])
    assert ev.model(ids).shape == (1, ids.shape[1], ev.model.params.vocab_size)
    assert info["calibration"] is None if method[0] == "magnitude" else info["calibration"]["source"] == "stdlib"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_dropping_saves_a_shallower_folder(hf_models, tmp_path, arch):
    out = _compress(hf_models[arch], tmp_path / "d", "--method", "drop-bi", "--layers", "1")
    ev = load_for_eval(out, "cpu")
    assert ev.model.params.n_layers == 2 == len(ev.model.layers)
    assert json.loads((out / "config.json").read_text())["model_type"] == arch
    prompts = [ev.tokenizer.encode("x = 1"), ev.tokenizer.encode("import os")]
    assert all(len(g) <= 4 for g in generate(ev.model, prompts, 4))  # decodes with the renumbered cache
    ids = torch.tensor([ev.tokenizer.encode(TEXT)])
    assert ev.model(ids).shape[-1] == ev.model.params.vocab_size


@pytest.mark.parametrize("arch", ["llama", "starcoder2", "gpt_neox"])
def test_structured_pruning_shrinks_and_reloads(hf_models, tmp_path, arch):
    out = _compress(
        hf_models[arch], tmp_path / "s", "--method", "structured", "--head-ratio", "0.5", "--skip-last", "1"
    )
    info = json.loads((out / "compression.json").read_text())
    assert info["params_after"] < info["params_before"]
    sizes = info["report"]["layers"]
    assert sizes[-1]["mlp_channels"] == 128 and sizes[0]["mlp_channels"] < 128  # the last block kept intact
    assert sizes[0]["heads"] < sizes[-1]["heads"]
    ev = load_for_eval(out, "cpu")
    assert ev.n_params == info["params_after"]
    ids = torch.tensor([ev.tokenizer.encode(TEXT)])
    full = ev.model(ids)
    assert torch.isfinite(full).all()
    # the KV cache path agrees with the full forward on the pruned (uneven) blocks
    ev.model.setup_caches(1, ids.shape[1])
    step = ev.model(ids[:, :-1], torch.arange(ids.shape[1] - 1))
    last = ev.model(ids[:, -1:], torch.tensor([ids.shape[1] - 1]))
    ev.model.clear_caches()
    torch.testing.assert_close(torch.cat([step, last], 1), full, rtol=1e-4, atol=1e-4)


def test_structured_pruning_of_gpt2_is_refused_in_one_line(hf_models, tmp_path):
    with pytest.raises(ValueError, match="needs a known block layout .*Llama, GPT-NeoX, Starcoder2.*a gpt2 model"):
        _compress(hf_models["gpt2"], tmp_path / "s", "--method", "structured")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantized_hf_folder_loads_its_stored_int8_weights(hf_models, tmp_path, arch):
    out = _compress(hf_models[arch], tmp_path / "q", "--method", "quantize", "--scheme", "int8-dynamic")
    assert (out / "quantized.pt").is_file() and not list(out.glob("*.safetensors"))  # stored quantized
    ev = load_for_eval(out, "cpu")
    assert ev.quantized
    assert not any(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear for m in ev.model.layers.modules())
    ids = torch.tensor([ev.tokenizer.encode(TEXT)])
    ref = load_for_eval(hf_models[arch], "cpu").model(ids)
    assert (ev.model(ids) - ref).abs().max() < 0.05 * ref.abs().max()  # close to the float model, not equal


def test_hf_compression_needs_a_calibration_corpus(hf_models, tmp_path):
    from compress.__main__ import main

    with pytest.raises(ValueError, match="pass --calib-corpus"):
        main(["--checkpoint", str(hf_models["llama"]), "--out", str(tmp_path / "w"), "--method", "wanda"])


# ---------------------------------------------------------------------------------------------------------
# lm-evaluation-harness


def _tasks(folder: Path) -> Path:
    rows = [
        {"question": "x = 1 +", "choices": [" 1", " def", " )"], "answer": 0, "text": TEXT},
        {
            "question": "def f(x):\n    return",
            "choices": [" x", " import"],
            "answer": 0,
            "text": "for i in range(3):\n",
        },
    ]
    return write_local_tasks(folder, rows, "local")


class _Request:
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("checkpoint", ["llama", "gpt2", "ours"])
def test_lm_eval_adapter_loglikelihoods_equal_the_model_own(hf_models, trained_checkpoint, checkpoint):
    from eval.lm_eval_model import ProjectLM

    folder = trained_checkpoint if checkpoint == "ours" else hf_models[checkpoint]
    lm = ProjectLM(str(folder), device="cpu", batch_size=2)
    pairs = [("def f(x):", " return x"), ("x =", " 1"), ("", "import os"), ("print(1)  ", "# done")]
    got = lm.loglikelihood([_Request(*p) for p in pairs])
    tok, model = lm.ev.tokenizer, lm.ev.model
    for (context, continuation), (logp, greedy) in zip(pairs, got, strict=True):
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:  # lm-eval's rule for an empty context: the prefix token stands for it
            ctx, cont = [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = F.log_softmax(model(ids[:, :-1]).float(), -1)[0, len(ctx) - 1 :]
        expected = lp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert logp == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())
    short = "import os\nprint(os.sep)\n"  # one window: shorter than every model's context
    [rolling] = lm.loglikelihood_rolling([_Request(short)])
    doc = lm.tok_encode(short)  # as HFLM encodes a document: the tokenizer's default (<s> first for Llama's)
    assert len(doc) < lm.max_length
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([[tok.bos_id, *doc[:-1]]])).float(), -1)[0]
    assert rolling == pytest.approx(lp.gather(-1, torch.tensor(doc)[:, None]).sum().item(), abs=1e-3)


def test_harness_runs_local_tasks_with_time_and_energy(hf_models, tmp_path):
    from eval.harness import main

    tasks = _tasks(tmp_path)
    out = tmp_path / "harness.json"
    main(
        [str(hf_models["gpt_neox"]), "--tasks", "local_mc", "local_rolling", "local_gen"]
        + ["--include-path", str(tasks), "--device", "cpu", "--idle", "0", "--out", str(out)]
    )
    r = json.loads(out.read_text())
    assert r["architecture"] == "gpt_neox"
    mc, rolling, gen = (r["results"][t] for t in ("local_mc", "local_rolling", "local_gen"))
    assert mc["requests"]["loglikelihood"] == 5 and 0 <= mc["metrics"]["local_mc"]["acc,none"] <= 1
    assert rolling["requests"]["loglikelihood_rolling"] == 2
    assert rolling["metrics"]["local_rolling"]["bits_per_byte,none"] > 0
    assert gen["requests"]["generate_until"] == 2
    for t in (mc, rolling, gen):
        assert t["time_s"] > 0
        e = t["energy"]
        assert e["method"] == "unavailable" and e["reason"] or e.get("energy_j") is None or e["energy_j"] > 0


def test_a_hub_name_without_network_is_one_clear_line(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="EleutherAI/pythia-14m is not a local folder and could not be fetched"):
        load_for_eval("EleutherAI/pythia-14m", "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a local path stays a local path
        load_for_eval("tests/no-such-run", "cpu")


def test_quality_and_efficiency_evaluators_take_a_hf_folder(hf_models, trained_checkpoint, tmp_path, sandbox):
    from eval.efficiency import main as efficiency
    from eval.quality import main as quality

    folder = str(hf_models["starcoder2"])
    q = tmp_path / "q.json"
    quality(
        [folder, "--heldout-of", str(trained_checkpoint), "--max-tokens", "300", "--n-docs", "2"]
        + ["--prompt-tokens", "16", "--continuation-tokens", "8", "--humaneval-limit", "1"]
        + ["--max-new-tokens", "8", "--device", "cpu", "--out", str(q)]
    )
    r = json.loads(q.read_text())
    assert r["architecture"] == "starcoder2" and r["perplexity"]["bits_per_byte"] > 0
    assert r["perplexity"]["source"].startswith("held-out split of") and r["continuation"]["pairs"] == 2
    e = tmp_path / "e.json"
    efficiency(
        [folder, "--batch-sizes", "1", "--context", "16", "--n-tokens", "2", "--repeats", "1"]
        + ["--no-energy", "--device", "cpu", "--out", str(e)]
    )
    r = json.loads(e.read_text())
    assert [f["engine"] for f in r["forward"]] == ["torch", "compile"]  # the engines set up for HF models
    assert r["decode"][0]["ms_per_token"]["median"] > 0 and r["disk_bytes"] > 0
    assert [d["mode"] for d in r["decode"]] == ["eager"]
    with pytest.raises(ValueError, match="--modes compile needs a static KV cache .*a starcoder2 model"):
        efficiency([folder, "--modes", "compile", "--device", "cpu", "--out", str(e)])
