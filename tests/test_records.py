"""Every record is checked against what it claims to be: a study reuses a trained run, a compressed model or a
result only when what made it matches what the study would run now (its options and its inputs' fingerprints,
recorded inside the output), however its markers or logs were edited; result files are about the model whose row
they fill, with figures of the right type and range; an evaluator replaces only a result it can show is about the
same model."""

import json
import shutil
from pathlib import Path

import pytest

from common.records import TrainingSummary
from common.results import read_typed
from compress.__main__ import main as compress_main
from eval.perplexity import main as perplexity_main
from models.folders import fingerprint
from runners.study_file import CompressSpec, RunSpec, Study, check_study
from runners.study_steps import CompressStep, EvaluateStep


@pytest.fixture
def base(trained_checkpoint, tmp_path):
    """A copy of a trained run, so that the tests can retrain (edit) it."""
    folder = tmp_path / "ck" / "b"
    shutil.copytree(trained_checkpoint, folder)
    return folder


def study_of(tmp_path, compress_args) -> Study:
    return Study(
        name="s",
        runs=[RunSpec("tiny", "b")],
        compress=[CompressSpec("b", "b-w", compress_args)],
        checkpoints_dir=str(tmp_path / "ck"),
        logs_dir=str(tmp_path / "logs"),
        results_dir=str(tmp_path / "res"),
    )


def test_a_compressed_model_is_reused_only_for_the_same_options_and_base(base, tmp_path):
    s = study_of(tmp_path, ["--method", "magnitude", "--sparsity", "0.5"])
    step = CompressStep.of(s, s.compress[0])
    assert not step.done(s)
    compress_main(step.argv)
    assert step.done(s)
    # the same options in other spellings: still this model
    for spelling in (["--method=magnitude", "--sparsity=0.5"], ["--sparsity", "0.50", "--method", "magnitude"]):
        s.compress[0].args = spelling
        assert CompressStep.of(s, s.compress[0]).done(s)
    # edited to 0.9 (its marker deleted or not): the folder says 0.5, so it is compressed again
    s.compress[0].args = ["--method", "magnitude", "--sparsity", "0.9"]
    assert not CompressStep.of(s, s.compress[0]).done(s)
    # the base retrained since (its weights changed): the compressed model is not from it any more
    s.compress[0].args = ["--method", "magnitude", "--sparsity", "0.5"]
    step_dir = sorted(base.glob("step_*"))[-1]
    (step_dir / "model.safetensors").write_bytes((step_dir / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    (step_dir / "checksums.json").unlink()
    assert not CompressStep.of(s, s.compress[0]).done(s)


def test_a_result_is_reused_only_for_its_own_model_as_it_is_and_its_options(base, tmp_path):
    s = study_of(tmp_path, ["--method", "magnitude"])
    s.quality = []
    out = tmp_path / "res" / "s" / "evals"
    step = EvaluateStep("perplexity", "b", base, ["--max-tokens", "200"])
    assert not step.kept(s)
    perplexity_main([str(base), "--out", str(step.output(s)), "--max-tokens", "200"])
    assert step.kept(s)
    assert EvaluateStep("perplexity", "b", base, ["--max_tokens=200"]).kept(s)  # one option, two spellings
    assert not EvaluateStep("perplexity", "b", base, ["--max-tokens", "300"]).kept(s)  # other options: again
    # copied over another model's result: refused in one line, never read as that model's
    other = tmp_path / "ck" / "c"
    shutil.copytree(base, other)
    theirs = EvaluateStep("perplexity", "c", other, ["--max-tokens", "200"])
    theirs.output(s).write_text(step.output(s).read_text())
    with pytest.raises(ValueError, match=r"c-perplexity.json is a result about b@step_30 \(.*\), not c: it was copied"):
        theirs.kept(s)
    # the model changed since it was measured (retrained or edited): measured again
    step_dir = sorted(base.glob("step_*"))[-1]
    (step_dir / "model_args.json").write_text((step_dir / "model_args.json").read_text() + " ")
    assert not step.kept(s)
    assert out.is_dir()


def test_options_the_study_sets_are_refused_when_negated_too(tmp_path):
    s = study_of(tmp_path, ["--method", "magnitude"])
    s.quality = ["--no-out"]
    with pytest.raises(ValueError, match="--no-out is set by the study itself"):
        check_study(s, "s")
    s.quality = []
    for args in (["--no-max-tokens"], ["--no-heldout-of"], ["--no_heldout_of"], ["--no-near-duplicates"]):
        s.over_training = args
        with pytest.raises(ValueError, match="is set by the study itself"):
            check_study(s, "s")
    s.over_training = []
    s.compress[0].args = ["--method", "magnitude", "--no-out"]
    with pytest.raises(ValueError, match="--no-out is set by the study itself"):
        check_study(s, "s")


@pytest.fixture(scope="module")
def quality_text(trained_checkpoint, tmp_path_factory) -> str:
    """A real quality result (the evaluator run once for the module: it takes seconds)."""
    from eval.quality import main as quality_main

    out = tmp_path_factory.mktemp("quality") / "q.json"
    quality_main(
        [str(trained_checkpoint), "--out", str(out), "--max-tokens", "200", "--n-docs", "1"]
        + ["--prompt-tokens", "8", "--continuation-tokens", "4", "--humaneval-limit", "1", "--max-new-tokens", "8"]
    )
    return out.read_text()


@pytest.fixture
def quality_record(quality_text, tmp_path):
    """The quality result in a file of the test's own (which it damages), and its record."""
    out = tmp_path / "q.json"
    out.write_text(quality_text)
    return out, json.loads(quality_text)


@pytest.mark.parametrize(
    "where, value, field",
    [
        (("perplexity", "bits_per_byte"), float("nan"), "bits_per_byte"),
        (("perplexity", "bits_per_byte"), 1e308, "bits_per_byte"),
        (("perplexity", "tokens_scored"), -5, "tokens_scored"),
        (("perplexity", "perplexity"), "12", "perplexity"),
        (("continuation", "bleu"), 140.0, "continuation.bleu"),
        (("n_layers",), "2", "n_layers"),
        (("params",), -1, "params"),
        (("checkpoint",), 7, "checkpoint"),
    ],
)
def test_a_result_with_a_figure_of_the_wrong_type_or_range_is_one_line(quality_record, where, value, field):
    out, record = quality_record
    bad = json.loads(json.dumps(record))
    node = bad
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    out.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"{out.name} is .*{field}"):
        read_typed(out)


def test_a_document_figure_out_of_range_is_one_line(quality_record):
    out, record = quality_record
    record["perplexity"]["per_document"][0]["nats"] = -1.0
    out.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"per_document\[0\].nats = -1.0"):
        read_typed(out)


@pytest.mark.parametrize(
    "field, value", [("flops_per_token", "x"), ("steps", -3), ("final_val_loss", float("inf")), ("compile", "yes")]
)
def test_a_training_summary_of_the_wrong_type_is_one_line(tmp_path, field, value):
    summary = {"name": "r", "steps": 4, "tokens": 100, "final_val_loss": 3.0, "flops_per_token": 1e6}
    (tmp_path / "summary.json").write_text(json.dumps(summary | {field: value}))
    with pytest.raises(ValueError, match=rf"summary.json: {field} = "):
        TrainingSummary.read(tmp_path)


def test_an_evaluator_replaces_only_a_result_that_names_its_model(trained_checkpoint, tmp_path):
    out = tmp_path / "p.json"
    perplexity_main([str(trained_checkpoint), "--out", str(out), "--max-tokens", "200"])
    record = json.loads(out.read_text())
    perplexity_main([str(trained_checkpoint), "--out", str(out), "--max-tokens", "200"])  # its own: replaced
    for edit in ({"checkpoint": None}, {"checkpoint": ""}):
        out.write_text(json.dumps({k: v for k, v in (record | edit).items() if v is not None}))
        before = out.read_text()
        with pytest.raises(ValueError, match="names no model folder"):
            perplexity_main([str(trained_checkpoint), "--out", str(out), "--max-tokens", "200"])
        assert out.read_text() == before  # nothing written


def test_fingerprints_tell_models_apart_and_ignore_training_state(trained_checkpoint, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_checkpoint, copy)
    assert fingerprint(copy) == fingerprint(trained_checkpoint)
    step = sorted(copy.glob("step_*"))[-1]
    (step / "state.json").write_text((step / "state.json").read_text().replace('"step"', '"step" ', 1))
    assert fingerprint(copy) == fingerprint(trained_checkpoint)  # the training state is not the model
    (step / "model_args.json").write_text(json.dumps(json.loads((step / "model_args.json").read_text())) + "\n\n")
    assert fingerprint(copy) != fingerprint(trained_checkpoint)
    assert Path(step).is_dir()


def test_a_study_record_is_read_by_the_one_table_reader_nested_members_included(tmp_path):
    """study.json is read by common.cli.from_table, as study files and options are: each member's table too,
    so a mistyped, unknown or missing key anywhere is one line naming the file, the member and the key."""
    import json

    from common.cli import ConfigError
    from common.records import Member, StudyRecord

    m = Member("g", 0, "g-s0", "trained", 1337, "g-s0")
    StudyRecord("s", "--tiny", 2, [m], {"g": "runners.tiny"}).write(tmp_path)
    good = json.loads((tmp_path / "study.json").read_text())
    assert StudyRecord.read(tmp_path).members == [m]
    bad = [
        (good | {"workers": "2"}, r"study.json: workers = '2' is not a whole number"),
        (good | {"members": [good["members"][0] | {"seed": "0"}]}, r"members #1: seed = '0' is not a whole number"),
        (good | {"members": [good["members"][0] | {"foo": 1}]}, r"members #1: unknown key\(s\) \['foo'\]"),
        (good | {"members": "x"}, r"members = 'x' is not a list of tables \(Member\)"),
        ({k: v for k, v in good.items() if k != "name"}, "missing name"),
    ]
    for record, message in bad:
        (tmp_path / "study.json").write_text(json.dumps(record))
        with pytest.raises(ConfigError, match=message):
            StudyRecord.read(tmp_path)
