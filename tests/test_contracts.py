"""The seams between the parts of the project, written down and held: configs whose derived values follow the
fields they derive from, exports found by the model they came from, per-head settings that survive into the
results, comparisons that check the condition they name, atomic writes, errors that are bugs, and latency
verdicts that agree with their intervals."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cli import ConfigError, apply_overrides, run_main
from llama.model import HeadLayerArgs, ModelArgs, Transformer

REPO = Path(__file__).resolve().parents[1]


# ---- configs: an override lands before anything derived from it -------------------------------------------


def tiny_config():
    from runners.tiny import config

    return config()


def test_overriding_n_heads_moves_the_key_value_heads_with_it():
    cfg = apply_overrides(tiny_config(), ["--n-heads", "8"])
    model = Transformer(cfg.model)
    assert model.layers[0].attention.n_kv_heads == 8  # plain multi-head attention, as no --n-kv-heads asked
    cfg = apply_overrides(tiny_config(), ["--n-heads", "8", "--n-kv-heads", "2"])
    assert Transformer(cfg.model).layers[0].attention.n_kv_heads == 2


@pytest.mark.parametrize("argv", [["--no-head-layer", "--hidden-dim", "32"], ["--hidden-dim", "32", "--no-head-layer"]])
def test_a_field_of_a_removed_part_is_an_error_not_silently_dropped(argv):
    with pytest.raises(ConfigError, match="--hidden-dim sets a field of model.head_layer, which --no-head-layer"):
        apply_overrides(tiny_config(), argv)


@pytest.mark.parametrize(
    "argv, check",
    [
        (["--n-heads", "8"], lambda c: c.model.kv_heads(0) == 8 and c.model.n_rep == 1),
        (["--vocab-size", "2048"], lambda c: c.model.vocab_size == 2048),
        (["--dim", "256"], lambda c: c.model.head_layer_dim == 256 // c.model.n_heads),
        (
            ["--dim", "256"],
            lambda c: c.model.ffn_hidden_dim == Transformer(c.model).layers[0].feed_forward.w1.out_features,
        ),
        (["--n-heads", "8"], lambda c: c.model.head_layer_dim == c.model.dim // 8),
    ],
)
def test_every_derived_field_follows_what_it_derives_from(argv, check):
    # n_kv_heads (unset: n_heads), model.vocab_size (data.vocab_size), the per-head hidden size (unset: head_dim)
    # and the SwiGLU hidden size (dim, multiple_of) after the override, never before it
    assert check(apply_overrides(tiny_config(), argv))


# ---- exports: found by the model they came from -----------------------------------------------------------


def test_an_export_in_the_work_folder_is_never_used_for_another_model(tiny_args, tmp_path):
    from runtime.decoding import build_decoder
    from runtime.engines import check

    torch.manual_seed(0)
    a, b = Transformer(tiny_args).eval(), Transformer(tiny_args).eval()
    build_decoder("onnxruntime", a, torch.device("cpu"), tmp_path)
    decoder = build_decoder("onnxruntime", b, torch.device("cpu"), tmp_path)  # the same folder, another model
    check(decoder, b, [[1, 5, 7, 9]], 6)  # decodes b, not a (it raised "differs from eager" before)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


# ---- results: the per-head settings are part of a model's identity ------------------------------------------


def test_per_head_variants_stay_apart_in_results_and_tables(small_tokenizer, tmp_path):
    from eval.model import load_for_eval
    from llama.model_io import save_model
    from visualizations.compare import collect, per_head_label, write_table

    for name, hl in (("h64", HeadLayerArgs(hidden_dim=64, activation="silu")), ("h8", HeadLayerArgs(8, "gelu"))):
        args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=small_tokenizer.vocab_size, multiple_of=32)
        args.head_layer = hl
        folder = save_model(Transformer(args), tmp_path / name, small_tokenizer.path)
        ev = load_for_eval(folder, "cpu")
        from eval.perplexity import Args as PerplexityArgs

        options = PerplexityArgs(checkpoint=str(folder), out=str(tmp_path / "r" / f"{name}.json"))
        ev.write("perplexity", {"perplexity": 10.0, "bits_per_byte": 1.0, "mode": "sliding"}, options)
    results = {json.loads((tmp_path / "r" / f"{n}.json").read_text())["model"]: n for n in ("h64", "h8")}
    specs = {
        json.loads((tmp_path / "r" / f"{n}.json").read_text())["head_layer"]["hidden_dim"] for n in results.values()
    }
    assert specs == {64, 8}
    rows = {r["model"]: r for r in collect(tmp_path / "r")}
    assert per_head_label(rows["h64"]) == "64 silu" and per_head_label(rows["h8"]) == "8 gelu"
    md, _ = write_table(list(rows.values()), tmp_path / "t")
    assert "| 64 silu |" in md.read_text() and "| 8 gelu |" in md.read_text()
    # every kind of richer head is named (a model with per-head RMSNorm alone once showed an empty cell)
    for kwargs, label in (
        ({"head_layer": None, "head_norm": True}, "RMSNorm per head"),
        ({"head_layer": None, "attn_gate": "headwise"}, "gate headwise"),
        ({"head_layer": None}, "no"),
    ):
        assert per_head_label({"head_layer": ModelArgs(**kwargs).head_layer_spec()}) == label
    assert per_head_label({"head_layer": {"a_setting_of_later_code": 1}}) == "yes"


def test_per_head_variants_of_one_depth_are_compared_with_each_other():
    from visualizations.grouped import comparisons

    rows = [
        {
            "model": "ph64",
            "kind": "trained",
            "base": None,
            "n_layers": 3,
            "per_head": True,
            "train_tokens": 100,
            "head_layer": {"hidden_dim": 64, "activation": "silu", "residual": True},
            "bits_per_byte": {"values": [1.0, 1.01, 1.02], "mean": 1.01, "n": 3},
        },
        {
            "model": "ph256",
            "kind": "trained",
            "base": None,
            "n_layers": 3,
            "per_head": True,
            "train_tokens": 100,
            "head_layer": {"hidden_dim": 256, "activation": "silu", "residual": True},
            "bits_per_byte": {"values": [0.9, 0.91, 0.92], "mean": 0.91, "n": 3},
        },
    ]
    comps = comparisons(rows, Path("/nonexistent"))
    pair = [c for c in comps if {c["a"], c["b"]} == {"ph64", "ph256"}]
    assert pair and pair[0]["what"].startswith("bits per byte") and pair[0]["distinguishable"]


# ---- comparisons check the condition they name --------------------------------------------------------------
# (tests/test_visualizations.py: test_matched_tokens_is_said_only_when_the_tokens_match)


# ---- atomic writes ------------------------------------------------------------------------------------------


def test_a_crash_while_writing_the_summary_or_the_config_keeps_the_earlier_one(tmp_path, make_config, monkeypatch):
    from training.trainer import train

    train(make_config(tmp_path, max_steps=2))
    summary, config = tmp_path / "logs/t/summary.json", tmp_path / "logs/t/config.json"
    before = summary.read_text(), config.read_text()
    real_write_bytes = Path.write_bytes

    def torn(self, data):  # half the bytes, then the disk is full
        if self.name.startswith((".summary.json", ".config.json", "summary.json", "config.json")):
            real_write_bytes(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(self, data)

    def torn_text(self, text, *a, **k):
        return torn(self, text.encode())

    monkeypatch.setattr(Path, "write_bytes", torn)
    monkeypatch.setattr(Path, "write_text", torn_text)
    with pytest.raises(OSError):
        train(make_config(tmp_path, max_steps=4, resume=True))
    assert (summary.read_text(), config.read_text()) == before  # whole, the earlier ones
    json.loads(summary.read_text())


# ---- a bug is not bad input ---------------------------------------------------------------------------------


def test_a_genuine_bug_keeps_its_traceback():
    code = "from common.cli import run_main\nrun_main(lambda: int('not a number'))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" in out.stderr and "ValueError: invalid literal" in out.stderr


def test_bad_input_is_still_one_line(capsys):
    from common.cli import UserError

    def bad():
        raise UserError("the file is damaged; use another")

    with pytest.raises(SystemExit) as e:
        run_main(bad)
    assert e.value.code == 2 and capsys.readouterr().err == "error: the file is damaged; use another\n"


# ---- latency verdicts agree with their intervals -------------------------------------------------------------


def test_the_case_the_tiny_study_printed_is_now_a_difference():
    # "tiny_perhead_3l / tiny_baseline_3l = x1.195 [1.120, 1.529]; not distinguishable (q = 0.476)": every
    # round was slower, an unpaired test could not see it; the paired one does, and says so with its interval
    from common.stats import adjust, paired_ratio

    rng = np.random.default_rng(0)
    base = list(rng.lognormal(0.0, 0.3, 15))  # a busy machine: rounds differ a lot
    ph = [b * r for b, r in zip(base, rng.uniform(1.12, 1.5, 15), strict=True)]
    [t] = adjust([paired_ratio(ph, base)])
    assert t["distinguishable"] and t["ci_low"] > 1 and t["median"] > 1


def test_a_verdict_and_its_interval_cannot_disagree():
    from common.stats import adjust, paired_ratio

    rng = np.random.default_rng(1)
    for n in (3, 5, 8, 15, 40):
        for shift in (0.0, 0.01, 0.03, 0.1):
            for _ in range(8):
                b = rng.lognormal(0, 0.2, n)
                a = b * np.exp(shift + rng.normal(0, 0.05, n))
                r = paired_ratio(list(a), list(b))
                [t] = adjust([dict(r)])
                holds_one = r["ci_low"] <= 1 <= r["ci_high"]
                assert (r["p"] < 0.05) == (not holds_one), r  # the interval inverts the test that gave p
                assert not (t["distinguishable"] and holds_one)


def test_an_interval_that_excludes_one_is_never_reported_as_nothing_without_saying_so():
    from visualizations.grouped import sentence

    c = {
        "a": "ph3",
        "b": "base3",
        "what": "decode ms/token (side by side)",
        "ratio": {"median": 1.134, "ci_low": 1.004, "ci_high": 1.286, "n": 15},
        "p": 0.03,
        "q": 0.12,
        "distinguishable": False,
    }
    assert "the unadjusted 95% interval alone excludes 1" in sentence(c, 3)
    # every printed interval names its level (a test at another level prints that one)
    assert "x1.134 [1.004, 1.286] (95%)" in sentence(c, 3)
    c["ratio"]["confidence"] = 0.9964
    assert "[1.004, 1.286] (99.64%)" in sentence(c, 3)


# ---- the model contract: every family's model and tokenizer offer the same things ------------------------


@pytest.mark.parametrize("arch", ["perhead-llama", "llama", "gpt2"])
def test_every_family_offers_the_model_and_tokenizer_contract(arch, tmp_path, small_tokenizer):
    """This project's model and transformers' (through models.hf) satisfy one CausalLM and one Tokenizer
    protocol; what differs (capabilities, LoRA targets, saving) comes from the family's definition."""
    from models.families import FAMILIES, family_of
    from models.folders import load_folder, save_folder
    from models.interface import CausalLM, Tokenizer, capabilities, lora_targets
    from tests.hf_models import make_hf_model

    if arch == "perhead-llama":
        model, tok = (
            Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=1000, max_seq_len=32)),
            small_tokenizer,
        )
    else:
        model, tok, _ = load_folder(make_hf_model(arch, tmp_path / "hf"))
    assert isinstance(model, CausalLM) and isinstance(tok, Tokenizer)
    assert model.params.head_layer_spec() is None and family_of(model) is FAMILIES[arch]
    assert capabilities(model).static_cache == (arch == "perhead-llama")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(lora_targets(model)) <= names  # every default target is a layer of the model
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text, bos=False)) == text
    (tmp_path / "saved").mkdir()
    save_folder(model, tok, tmp_path / "saved")  # in the family's own format, and back
    again, tok2, _ = load_folder(tmp_path / "saved")
    assert again.family == model.family and tok2.encode(text) == tok.encode(text)
    x = torch.randint(0, 100, (1, 8))
    assert torch.equal(again.eval()(x), model.eval()(x))


@pytest.mark.parametrize("arch", ["perhead-llama", "llama", "gpt2", "gpt_neox", "starcoder2"])
def test_every_family_scores_two_sequences_packed_in_one_row_as_each_alone(arch, tmp_path):
    """The forward's packed form (per-row positions, a (B, 1, T, T) mask, ``keep``: the logits of chosen positions
    alone), which the lm-eval adapter scores shared contexts with: a context followed by two continuations, each
    seeing the context and itself at the positions it has alone, gives each continuation's logits as its own
    forward does."""
    from eval.lm_eval_model import packed_batch, packed_row
    from models.folders import load_folder
    from tests.hf_models import make_hf_model

    torch.manual_seed(0)
    if arch == "perhead-llama":
        args = ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=100, max_seq_len=32, head_layer=HeadLayerArgs(8))
        model = Transformer(args)
    else:
        model = load_folder(make_hf_model(arch, tmp_path / "hf"))[0]
    model.eval()
    ctx, conts = [5, 6, 7, 8], [[9, 10, 11], [12, 13]]
    x, pos, mask, keep = packed_batch([packed_row(ctx, conts)])
    with torch.no_grad():
        packed = model(x, pos, mask[:, None], keep=keep)  # (kept positions, V)
        rows = (keep[0].cumsum(0) - 1).tolist()
        for cont, where in zip(conts, packed_row(ctx, conts)[3], strict=True):
            alone = model(torch.tensor([ctx + cont[:-1]]))[0, len(ctx) - 1 :]
            torch.testing.assert_close(packed[[rows[w] for w in where]], alone, atol=1e-5, rtol=1e-4)


# ---- typed records: a training summary goes through one schema, written and read --------------------------


def test_a_training_summary_round_trips_through_its_schema_and_another_version_is_refused(trained_checkpoint, tmp_path):
    from common.cli import UserError
    from common.records import TRAINING_SCHEMA, TrainingSummary

    log_dir = trained_checkpoint.parents[1] / "logs" / "t"
    written = json.loads((log_dir / "summary.json").read_text())
    assert written["schema"] == TRAINING_SCHEMA and written["per_head"] is True and written["head_layer"]
    summary = TrainingSummary.read(log_dir)
    assert summary.steps == 30 and summary.per_head and summary.extra["git_commit"] == written["git_commit"]
    assert summary.to_json() == written  # every field, derived ones and where it ran included
    copy = tmp_path / "copy"
    copy.mkdir()
    summary.write(copy)
    assert TrainingSummary.read(copy) == summary
    (copy / "summary.json").write_text(json.dumps(written | {"schema": 99}))
    with pytest.raises(UserError, match="schema version 99; this code reads version 1"):
        TrainingSummary.read(copy)
    old = {k: v for k, v in written.items() if k not in ("schema", "head_layer")}  # before versions and specs
    (copy / "summary.json").write_text(json.dumps(old))
    assert TrainingSummary.read(copy).head_layer == {} and TrainingSummary.read(copy).per_head
    for partial in ({"name": "t", "steps": 30}, [1, 2], "garbage"):  # not a finished run's summary
        (copy / "summary.json").write_text(json.dumps(partial))
        assert TrainingSummary.read(copy) is None
    (copy / "summary.json").write_text("{not json")
    assert TrainingSummary.read(copy) is None


def test_forward_engines_and_decoders_are_one_hierarchy_with_one_check(tiny_args):
    from runtime.decoding import TorchDecoder, build_decoder
    from runtime.engines import Engine, ForwardEngine, build, check

    torch.manual_seed(0)
    model = Transformer(tiny_args).eval()
    forward = build("torch", model, torch.randint(0, 97, (2, 8)))
    decoder = build_decoder("torch", model, torch.device("cpu"))
    assert isinstance(forward, Engine) and isinstance(decoder, Engine)
    assert check(forward, model) == 0.0 and check(decoder, model, [[1, 5, 9]], 4) is None

    class Off(TorchDecoder):  # every step's logits favour token 3: its greedy tokens go astray
        def next(self, token, pos):
            return super().next(token, pos) + 5.0 * torch.nn.functional.one_hot(torch.tensor(3), 97)

    with pytest.raises(ValueError, match="differs from eager greedy decoding"):
        check(Off(model, torch.device("cpu")), model, [[1, 5, 9]], 4)
    model.clear_caches()  # the torch decoder keeps its cache on the model between requests
    with pytest.raises(AssertionError, match="differs from eager PyTorch"):
        check(ForwardEngine("off", lambda t: model(t) + 1.0), model)


def test_an_evaluator_result_carries_its_schema_version_and_another_version_is_refused(tmp_path):
    from common.cli import UserError
    from common.results import RESULT_SCHEMA, ModelIdentity, read_result, write_result
    from visualizations.compare import collect

    who = ModelIdentity("m", str(tmp_path / "m"), 10, 2, "perhead-llama", {"hidden_dim": 8}, None)
    payload = {"evaluator": "perplexity", **who.to_json(), "perplexity": 3.0, "bits_per_byte": 1.5}
    path = write_result(tmp_path / "r" / "m-perplexity.json", payload, torch.device("cpu"))
    result = read_result(path)
    assert result["schema"] == RESULT_SCHEMA and {k: result[k] for k in payload} == payload
    assert ModelIdentity.of(result) == who  # the identity read back through its record
    old = {k: v for k, v in result.items() if k != "schema"}  # written before versions were recorded
    path.write_text(json.dumps(old))
    assert read_result(path) == old and collect(tmp_path / "r")[0]["model"] == "m"
    path.write_text(json.dumps(result | {"schema": 7}))
    with pytest.raises(UserError, match="schema version 7; this code reads version 1"):
        read_result(path)
    with pytest.raises(UserError, match="schema version 7"):
        collect(tmp_path / "r")  # the table says so in one line, never a misread figure
    assert read_result(tmp_path / "none.json") is None


def test_evaluator_results_round_trip_through_their_typed_schema(tmp_path):
    """What readers take from each evaluator's result is what was written, and a payload missing a figure is
    refused before anything is written."""
    from common.results import (
        EfficiencyResult,
        HumanEvalResult,
        QualityResult,
        SideBySideResult,
        Spread,
        parse_result,
        read_result,
        write_result,
    )
    from common.timing import spread

    cpu = torch.device("cpu")
    who = {"model": "m", "checkpoint": "ck/m", "params": 10, "n_layers": 2, "head_layer": None}
    ppl = {"perplexity": 3.0, "bits_per_byte": 1.5, "tokens_scored": 400, "context": 32, "stride": 16}
    cont = {"bleu": 2.0, "rougeL": 4.0, "rougeL_code": 5.0, "pairs": 8}
    he = {"pass": {"pass@1": 0.25, "problems": 4, "samples_per_problem": 1}, "max_new_tokens": 48}
    q = parse_result(
        read_result(
            write_result(
                tmp_path / "q.json",
                {"evaluator": "quality", **who} | {"perplexity": ppl, "continuation": cont, "humaneval": he},
                cpu,
            )
        )
    )
    assert isinstance(q, QualityResult) and q.identity.model == "m" and not q.identity.per_head
    assert (q.perplexity.bits_per_byte, q.perplexity.tokens_scored, q.continuation.rougeL_code) == (1.5, 400, 5.0)
    assert (q.humaneval.pass_at_1, q.humaneval.problems, q.humaneval.max_new_tokens) == (0.25, 4, 48)
    assert q.device.startswith("cpu") and q.device_threads == torch.get_num_threads()

    h = parse_result(read_result(write_result(tmp_path / "h.json", {"evaluator": "humaneval", **who, **he}, cpu)))
    assert isinstance(h, HumanEvalResult) and h.humaneval == q.humaneval

    times = [2.0, 2.5, 3.0]
    unavailable = {"method": "unavailable", "reason": "no counter"}
    decode = [{"mode": "eager", "batch": b, "ms_per_token": spread(times), "energy": unavailable} for b in (1, 8)]
    eff = {"evaluator": "efficiency", **who, "decode": decode, "prefill": [], "memory_bytes": 40}
    e = parse_result(read_result(write_result(tmp_path / "e.json", eff, cpu)))
    assert isinstance(e, EfficiencyResult) and e.pick(e.decode, "eager", 8).ms == Spread(2.5, 2.0, 3.0, 3)
    assert e.decode[0].energy.figure == "unavailable" and e.pick(e.decode, "compile", 1) is None

    timed = {"decode_ms_per_token": spread(times), "decode_ms_samples": times, "energy": unavailable}
    ratio = {"median": 1.1, "ci_low": 1.0, "ci_high": 1.3, "p": 0.2}
    side = {"evaluator": "side_by_side", "reference": "a", "mode": "eager", "rounds": 3, "gated": None}
    side["models"] = {"a": timed, "b": timed | {"decode_ratio_to_reference": ratio}}
    s = parse_result(read_result(write_result(tmp_path / "s.json", side, cpu)))
    assert isinstance(s, SideBySideResult) and s.identity is None and s.rounds == 3
    assert s.models["b"].decode_ratio.ci_high == 1.3 and s.models["a"].decode_ratio is None
    assert s.models["a"].decode_samples == tuple(times) and s.models["a"].energy.flat()["method"] == "unavailable"

    # a writer that leaves out what readers take is stopped before anything is written, naming the field
    for name, payload, field in (
        ("q2", {"evaluator": "quality", **who, "perplexity": ppl, "continuation": cont}, "humaneval"),
        ("e2", eff | {"decode": [decode[0] | {"ms_per_token": {"median": 2.0}}]}, "p10"),
        ("s2", {**side, "models": {"a": {"decode_ms_per_token": spread(times)}}}, "decode_ms_samples"),
    ):
        with pytest.raises(ValueError, match=f"result without a readable field '{field}'"):
            write_result(tmp_path / f"{name}.json", payload, cpu)
        assert not (tmp_path / f"{name}.json").exists()
    # a result edited or cut since (a figure gone) is refused in one line naming the file, never misread
    from common.cli import UserError
    from common.results import read_typed

    damaged = json.loads((tmp_path / "q.json").read_text())
    del damaged["continuation"]["bleu"]
    (tmp_path / "q.json").write_text(json.dumps(damaged))
    with pytest.raises(UserError, match=r"q.json is a quality result without a readable field 'bleu'"):
        read_typed(tmp_path / "q.json")
    assert read_typed(tmp_path / "missing.json") is None
    (tmp_path / "q.json").write_text('{"evaluator": "quality", "perpl')
    with pytest.raises(UserError, match="q.json is not valid JSON"):
        read_typed(tmp_path / "q.json")
    # an evaluator whose figures have no typed reader here (lm-eval's harness tables) is written as it is
    assert parse_result(read_result(write_result(tmp_path / "x.json", {"evaluator": "harness", **who}, cpu))) is None
