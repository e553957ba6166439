import json
from pathlib import Path

import pytest
import torch

from common.records import StudyRecord
from common.results import write_result
from common.timing import spread
from visualizations.compare import collect, compression_label, write_table
from visualizations.plot_tradeoffs import tradeoff_figure
from visualizations.plot_training import load_runs, over_training, training_costs, training_curves

CPU = torch.device("cpu")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def logs(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        d = tmp_path / "logs" / name
        d.mkdir(parents=True)
        write_jsonl(
            d / "metrics.jsonl", [{"step": s, "loss": scale * 10 / s, "elapsed_s": scale * s} for s in (1, 2, 3)]
        )
        write_jsonl(d / "val.jsonl", [{"step": 3, "val_loss": scale * 4.0, "elapsed_s": scale * 3}])
        summary = {"name": name, "steps": 3, "tokens": 300, "final_val_loss": scale * 4.0}
        (d / "summary.json").write_text(json.dumps(summary | {"train_time_s": 30 * scale, "tokens_per_s": 100 / scale}))
    return tmp_path / "logs"


def test_training_curves_plot_the_logged_series(logs):
    runs = load_runs(logs)
    fig = training_curves(runs)
    by_step, by_time = fig.axes
    lines = by_step.get_lines()
    train = {ln.get_label(): ln for ln in lines if not ln.get_label().startswith("_")}
    assert set(train) == {"a", "b"} and [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    assert list(train["b"].get_xdata()) == [1, 2, 3]
    assert list(train["b"].get_ydata()) == pytest.approx([20, 10, 20 / 3])
    val = [ln for ln in lines if ln.get_marker() == "o"]
    assert sorted(list(ln.get_ydata()) for ln in val) == [[4.0], [8.0]]
    assert sorted(list(ln.get_xdata()) for ln in by_time.get_lines() if ln.get_marker() != "o")[1] == [2.0, 4.0, 6.0]
    assert by_time.get_xlabel().startswith("wall-clock") and "nats" in by_step.get_ylabel()


def test_training_curves_group_seeds_in_the_families_colours(logs):
    """Seeds of one model share a colour, a line style and one legend entry; two models of one family differ
    by line style; timed beside other work, no wall-clock panel."""
    runs = load_runs(logs)
    groups = {"a": {"model": "plain", "color": "C0"}, "b": {"model": "plain", "color": "C0"}}
    fig = training_curves(runs, groups, timed_alone=False)
    assert len(fig.axes) == 1 and [t.get_text() for t in fig.legends[0].get_texts()] == ["plain"]
    train = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() != "None"]
    assert {ln.get_color() for ln in train} == {"C0"} and {ln.get_linestyle() for ln in train} == {"-"}
    groups["b"] = {"model": "plain-1", "color": "C0"}
    lines = training_curves(runs, groups).axes[0].get_lines()
    train = [ln for ln in lines if ln.get_linestyle() != "None"]
    assert {ln.get_linestyle() for ln in train} == {"-", "--"}
    # and their validation dots by marker: two blue baselines stay apart
    assert {ln.get_marker() for ln in lines if ln.get_linestyle() == "None"} == {"o", "s"}


def test_training_costs_bars(logs, tmp_path):
    fig = training_costs(load_runs(logs))
    times, tps = fig.axes
    assert [p.get_height() for p in times.patches] == [30.0, 60.0]
    assert [p.get_height() for p in tps.patches] == [100.0, 50.0]
    fig.savefig(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_missing_run_is_a_clear_error(logs):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        load_runs(logs, ["a", "nope"])


def test_over_training_plots_quality_against_tokens_and_energy_only_when_measured(tmp_path):
    from common.results import parse_result, read_result

    def point(tokens, ppl, energy_j=None):
        path = tmp_path / f"r@{tokens}-perplexity.json"
        figures = {"perplexity": ppl, "bits_per_byte": ppl / 4, "mode": "sliding"}
        payload = {"evaluator": "perplexity", "model": f"r@{tokens}", **figures, "run": "r", "tokens": tokens}
        write_result(path, payload | {"energy_j": energy_j}, CPU)
        return parse_result(read_result(path))

    pts = {"r": [point(200, 5.0), point(100, 9.0)]}
    fig = over_training(pts)
    assert len(fig.axes) == 1  # no energy measured: no energy panel
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [100, 200] and list(line.get_ydata()) == [9.0, 5.0]
    (line,) = over_training(pts, "bits_per_byte").axes[0].get_lines()
    assert list(line.get_ydata()) == [2.25, 1.25]
    pts["r"][0] = point(200, 5.0, energy_j=50.0)
    assert len(over_training(pts).axes) == 2


def result(tmp_path, model, evaluator, **fields):
    """A result as its evaluator writes it (through write_result, which refuses one missing a figure)."""
    write_result(tmp_path / f"{model}-{evaluator}.json", {"evaluator": evaluator, "model": model, **fields}, CPU)


@pytest.fixture
def results(tmp_path):
    for model, bpb, ms, comp in (
        ("base", 1.5, 2.0, None),
        ("per", 1.4, 3.0, None),
        ("base-w50", 1.6, 1.0, {"method": "wanda", "sparsity": 0.5, "pattern": None}),
    ):
        common = {"n_layers": 4, "per_head": model == "per", "params": 1000}
        result(
            tmp_path,
            model,
            "quality",
            compression=comp,
            **common,
            perplexity={"perplexity": 2**bpb, "bits_per_byte": bpb},
            continuation={"bleu": 3.0, "rougeL": 7.0},
            humaneval={"pass": {"pass@1": 0.0}},
        )
        decode = [
            {
                "batch": 1,
                "mode": "eager",
                "ms_per_token": spread([ms]),
                "energy": {"method": "unavailable", "reason": "no counter"},
            },
            {"batch": 8, "mode": "eager", "ms_per_token": spread([9 * ms]), "energy": {"method": "unavailable"}},
        ]
        result(
            tmp_path,
            model,
            "efficiency",
            compression=comp,
            **common,
            memory_bytes=4000,
            decode=decode,
            prefill=[{"batch": 1, "mode": "eager", "ms": spread([5.0])}],
        )
    (tmp_path / "table.md").write_text("not a result")
    return tmp_path


def test_compare_collects_one_row_per_model(results):
    rows = {r["model"]: r for r in collect(results)}
    assert set(rows) == {"base", "per", "base-w50"}
    assert rows["base-w50"]["compression"] == "wanda 50%" and rows["base"]["compression"] == "none"
    assert rows["per"]["bits_per_byte"] == 1.4 and rows["per"]["decode_ms"] == 3.0 and rows["per"]["per_head"]
    assert rows["base"]["j_per_token"] == "unavailable" and rows["base"]["prefill_ms"] == 5.0
    assert {r["model"]: r["decode_ms"] for r in collect(results, batch=8)} == {
        "base": 18.0,
        "per": 27.0,
        "base-w50": 9.0,
    }
    md, csv_path = write_table(list(rows.values()), results / "out")
    text = md.read_text()
    assert "| base-w50 |" in text and "unavailable" in text and "wanda 50%" in text
    assert csv_path.read_text().splitlines()[0].startswith("model,params,n_layers")


def test_tradeoff_plot_data_and_no_front(results):
    rows = collect(results)
    fig = tradeoff_figure(rows, "decode_ms")
    ax = fig.axes[0]
    offsets = sorted(tuple(c.get_offsets()[0]) for c in ax.collections)
    assert offsets == [(1.0, 1.6), (2.0, 1.5), (3.0, 1.4)]
    assert ax.get_lines() == []  # single measurements: no front drawn from differences that may be noise
    assert tradeoff_figure(rows, "j_per_token") is None  # energy unavailable: no plot rather than zeros


def test_compression_labels():
    from common.results import Compression

    def label(record):  # compression.json as written, read as every reader reads it
        return compression_label(Compression.of(record))

    assert label({"method": "sparsegpt", "pattern": "2:4"}) == "sparsegpt 2:4"
    assert label({"method": "drop-angular", "layers": 2}) == "drop 2 (angular)"
    q = {"method": "quantize", "quantize": "int8-dynamic", "base_compression": {"method": "wanda", "sparsity": 0.5}}
    assert label(q) == "wanda 50% + int8-dynamic"
    assert label(None) == label({}) == "none"
    assert label({"method": "magnitude", "sparsity": 0.3, "finetune_steps": 20}) == "magnitude 30% +ft20"  # older
    lora = Compression.of(
        {"method": "structured", "head_ratio": 0.5, "ffn_ratio": 0.75, "recovery": {"method": "lora"}}
    )
    assert compression_label(lora.before_recovery()) == "structured h50/f75" and lora.recovery.steps is None


def _fake_study(tmp_path, bpb: dict, decode: dict, workers: int = 1):
    """A study folder as runners.study leaves it: members, per-seed quality, run logs, side-by-side latency.
    Groups are named <kind><layers> (base4, ph3, base3): ph is per-head."""
    from runners.study_file import RunSpec, Study

    s = Study(
        name="s",
        runs=[RunSpec("tiny", g) for g in bpb],
        seeds=3,
        checkpoints_dir=str(tmp_path / "ck"),
        logs_dir=str(tmp_path / "logs"),
        results_dir=str(tmp_path / "res"),
        workers=workers,
    )
    (s.out / "evals").mkdir(parents=True)
    s.record().write(s.out)  # study.json, as runners.study writes it
    layers = {g: int(g[-1]) for g in bpb}
    flops = {"base4": 4.0e6, "ph3": 3.2e6, "base3": 3.0e6}
    for m in s.members():
        g, k = m.group, m.seed
        quality = {
            "evaluator": "quality",
            "model": m.name,
            "params": 1000,
            "n_layers": layers[g],
            "per_head": g.startswith("ph"),
            "compression": None,
            "perplexity": {"bits_per_byte": bpb[g][k], "perplexity": 2 ** bpb[g][k]},
            "continuation": {"bleu": 1.0, "rougeL": 2.0, "rougeL_code": 3.0},
            "humaneval": {"pass": {"pass@1": 0.0}},
        }
        write_result(s.out / "evals" / f"{m.name}-quality.json", quality, CPU)
        log = Path(s.logs_dir) / m.run
        log.mkdir(parents=True)
        summary = {"name": m.run, "steps": 4, "final_val_loss": 3.0, "flops_per_token": flops[g], "tokens": 1000}
        summary |= {"epochs": 0.5, "train_time_s": 10.0 + k}
        (log / "summary.json").write_text(json.dumps(summary))
        val = [
            {"step": st, "tokens": 250 * st, "val_loss": 5.0 - st * (0.5 if g.startswith("ph") else 0.4) - 0.01 * k}
            for st in (1, 2, 3, 4)
        ]
        (log / "val.jsonl").write_text("".join(json.dumps(v) + "\n" for v in val))
        (log / "metrics.jsonl").write_text(
            json.dumps({"step": 4, "loss": 1.0, "tokens": 1000, "elapsed_s": 1.0}) + "\n"
        )
    side = {
        "evaluator": "side_by_side",
        "reference": "base4",
        "models": {
            g: {
                "decode_ms_per_token": {"median": sum(v) / len(v), "p10": min(v), "p90": max(v), "n": len(v)},
                "decode_ms_samples": v,
                "energy": {"method": "unavailable", "reason": "no counter"},
            }
            for g, v in decode.items()
        },
    }
    write_result(s.out / "side_by_side.json", side, CPU)
    return s


def test_grouped_comparisons_state_only_what_the_tests_support(tmp_path):
    from visualizations.grouped import comparisons, group_rows, sentence, write_grouped_table
    from visualizations.report import write_report

    # per-head bpb clearly lower; latency samples overlapping: only the first may be called a difference
    s = _fake_study(
        tmp_path,
        bpb={"base4": [2.00, 2.01, 2.02], "ph3": [1.90, 1.91, 1.90]},
        decode={"base4": [1.0, 1.2, 0.9, 1.1, 1.05, 0.95], "ph3": [1.01, 1.19, 0.91, 1.09, 1.06, 0.94]},
    )
    rows = group_rows(s.out, Path(s.logs_dir))
    row = {r["model"]: r for r in rows}
    assert row["ph3"]["bits_per_byte"]["values"] == [1.90, 1.91, 1.90] and row["ph3"]["seeds_measured"] == 3
    assert row["base4"]["bits_per_byte"]["ci_low"] < 2.01 < row["base4"]["bits_per_byte"]["ci_high"]
    comps = comparisons(rows, Path(s.logs_dir))
    by_what = {c["what"].split(" (")[0]: c for c in comps}
    assert by_what["bits per byte"]["distinguishable"] and "**lower**" in sentence(by_what["bits per byte"], 3)
    assert not by_what["decode ms/token"]["distinguishable"]
    assert "**not distinguishable** at 6 interleaved rounds" in sentence(by_what["decode ms/token"], 3)
    flops = next(c for c in comps if c["what"].startswith("val loss at matched training FLOPs"))
    # trained to different FLOP budgets: a curve read mid-schedule is biased, so no test is made
    assert flops["budget_flops"] == 3.2e6 * 1000 and flops["p"] is None and "mid-schedule" in flops["reason"]
    write_grouped_table(rows, s.out)
    import csv

    table = {r["model"]: r for r in csv.DictReader((s.out / "table.csv").open())}
    for column in ("ppl_mean", "bleu_mean", "rougeL_mean", "pass1_mean"):  # every figure of table.md, as numbers
        assert table["ph3"][column] != "", column
    assert float(table["ph3"]["ppl_mean"]) == pytest.approx(row["ph3"]["perplexity"]["mean"])
    assert float(table["ph3"]["decode_ms_median"]) == pytest.approx(row["ph3"]["decode_ms"]["median"])
    report = write_report(StudyRecord.read(s.out), s.out, rows, comps, {}, [], {}).read_text()
    assert "How to read this report" in report and "not distinguishable" in report and "**lower**" in report
    assert "no latency ranking is stated" in report
    empty = write_report(
        StudyRecord.read(s.out), s.out, rows, [], {}, [], {}
    ).read_text()  # e.g. the per-head model is the deepest
    assert "nothing to compare" in empty and "at least as deep" in empty


def test_overlapping_seeds_are_not_distinguishable(tmp_path):
    from visualizations.grouped import comparisons, group_rows

    s = _fake_study(
        tmp_path,
        bpb={"base4": [2.00, 1.95, 2.05], "ph3": [1.98, 2.04, 1.96]},
        decode={"base4": [1.0, 1.0, 1.0, 1.0], "ph3": [2.0, 2.0, 2.0, 2.0]},
    )
    comps = comparisons(group_rows(s.out, Path(s.logs_dir)), Path(s.logs_dir))
    bpb = next(c for c in comps if c["what"].startswith("bits per byte"))
    assert not bpb["distinguishable"]
    lat = next(c for c in comps if c["what"].startswith("decode"))
    assert lat["ratio"]["median"] == 2.0


def test_compare_and_tradeoffs_read_a_folder_of_every_result_kind(trained_checkpoint, tmp_path, monkeypatch, capsys):
    # Results written by the evaluators themselves, with their default names, into one folder.
    from eval.efficiency import main as efficiency_main
    from eval.model import load_for_eval
    from eval.perplexity import main as perplexity_main
    from visualizations.compare import main as compare_main
    from visualizations.plot_tradeoffs import main as tradeoffs_main

    monkeypatch.chdir(tmp_path)
    ckpt = str(trained_checkpoint)
    perplexity_main([ckpt, "--max-tokens", "300"])
    perplexity_main([ckpt, "--max-tokens", "300", "--mode", "lm-eval"])
    efficiency_main(
        [ckpt, "--batch-sizes", "1", "--n-tokens", "2", "--repeats", "1", "--engines", "torch", "--no-energy"]
    )
    ev = load_for_eval(ckpt, "cpu")
    from eval.harness import Args as HarnessArgs

    ev.write("harness", {"tasks": ["t"], "results": {}}, HarnessArgs(checkpoint=ckpt))  # a kind with no column
    names = sorted(p.name for p in (tmp_path / "results").glob("*.json"))
    model = ev.name
    assert f"{model}-perplexity.json" in names and f"{model}-perplexity-lm-eval.json" in names  # both kept
    compare_main(["results"])
    out = capsys.readouterr().out
    assert f"skipped {model}-harness.json" in out
    [row] = list(__import__("csv").DictReader((tmp_path / "results" / "table.csv").open()))
    sliding = json.loads((tmp_path / "results" / f"{model}-perplexity.json").read_text())
    lm_eval = json.loads((tmp_path / "results" / f"{model}-perplexity-lm-eval.json").read_text())
    assert float(row["perplexity"]) == pytest.approx(sliding["perplexity"])
    assert float(row["word_perplexity"]) == pytest.approx(lm_eval["word_perplexity"])
    assert float(row["bits_per_byte_lm_eval"]) == pytest.approx(lm_eval["bits_per_byte"])
    assert float(row["decode_ms"]) > 0
    tradeoffs_main(["results", "--out", "plots"])
    assert (tmp_path / "plots" / "tradeoff_decode_ms.png").stat().st_size > 1000


def test_the_report_says_what_was_evaluated_and_what_it_cannot_answer(tmp_path):
    from visualizations.grouped import comparisons, group_rows, write_grouped_table
    from visualizations.report import write_report

    # the 3-block baseline no better than the 4-block one: depth has not paid, so the per-head question is open
    s = _fake_study(
        tmp_path,
        bpb={"base4": [2.00, 2.02, 2.01], "base3": [2.00, 2.01, 2.02], "ph3": [1.99, 2.00, 2.01]},
        decode={"base4": [1.0, 1.1, 0.9], "base3": [0.8, 0.9, 0.85], "ph3": [0.9, 0.95, 0.92]},
        workers=2,
    )
    for path in (s.out / "evals").glob("*-quality.json"):  # what eval.quality records about its evaluation set
        q = json.loads(path.read_text())
        q["device"] = "cpu: x86_64 (1 threads)"
        q["perplexity"] |= {"tokens_scored": 40000, "source": "held-out split", "context": 256, "stride": 128}
        q["continuation"] |= {"pairs": 8, "prompt_tokens": 128, "continuation_tokens": 64}
        q["humaneval"] = {"pass": {"pass@1": 0.0, "problems": 8, "samples_per_problem": 1, "timeout_s": 3.0}}
        path.write_text(json.dumps(q))
    side = json.loads((s.out / "side_by_side.json").read_text())
    side |= {"device": "cpu: x86_64 (2 threads)", "rounds": 3, "n_tokens": 16, "context": 128, "prompt_len": 128}
    (s.out / "side_by_side.json").write_text(json.dumps(side | {"batch": 1, "mode": "eager"}))
    rows = group_rows(s.out, Path(s.logs_dir))
    comps = comparisons(rows, Path(s.logs_dir))
    depth = [c for c in comps if c.get("depth_check")]
    assert [(c["a"], c["b"]) for c in depth] == [("base4", "base3")]
    write_grouped_table(rows, s.out)
    report = write_report(StudyRecord.read(s.out), s.out, rows, comps, {}, [], {}).read_text()
    assert "40,000 held-out tokens" in report and "8 of the 164 problems" in report and "8 held-out documents" in report
    assert "3 interleaved rounds; decode of 16 tokens after a context of 128" in report
    assert "(1 threads)" not in report.split("\n")[2]  # the header names the machine, then each step's threads
    assert "1 thread(s) each, 2 step(s) at once" in report and "timed alone with 2 thread(s)" in report
    assert "Depth has not paid yet" in report and "cannot say whether per-head layers" in report
    assert "† Taken with up to 2 steps" in report


def test_matched_tokens_is_said_only_when_the_tokens_match(tmp_path):
    from visualizations.grouped import comparisons, group_rows

    s = _fake_study(
        tmp_path, bpb={"base4": [2.0, 2.1, 2.05], "ph3": [1.9, 2.0, 1.95]}, decode={"base4": [1.0], "ph3": [1.0]}
    )
    summary = Path(s.logs_dir) / "ph3-s0" / "summary.json"
    for seed in range(3):
        path = Path(s.logs_dir) / f"ph3-s{seed}" / "summary.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"tokens": 2000}))
    assert summary.is_file()
    comps = comparisons(group_rows(s.out, Path(s.logs_dir)), Path(s.logs_dir))
    bpb = next(c for c in comps if c["what"].startswith("bits per byte"))
    assert bpb["what"] == "bits per byte (tokens differ: 2000 vs 1000)"


def test_a_recovered_model_is_compared_with_its_unrecovered_twin_and_its_dense_base(tmp_path):
    from common.results import Compression
    from common.stats import mean_ci
    from visualizations.grouped import comparisons

    compression = {"method": "drop-bi", "layers": 1, "recovery": {"method": "lora", "steps": 30}}
    assert compression_label(Compression.of(compression)) == "drop 1 (bi) +lora30"

    def row(model, kind, base, bpb, **extra):
        return {"model": model, "kind": kind, "base": base, "n_layers": 4, "bits_per_byte": mean_ci(bpb)} | extra

    rows = [
        row("base4", "trained", None, [2.00, 2.01, 2.02]),
        row("base4-drop1", "compressed", "base4", [2.60, 2.62, 2.61], compression="drop 1 (bi)"),
        row(
            "base4-drop1-lora",
            "compressed",
            "base4",
            [2.20, 2.22, 2.21],
            compression="drop 1 (bi) +lora30",
            recovery="lora",
            compression_before_recovery="drop 1 (bi)",
        ),
    ]
    comps = {c["what"]: c for c in comparisons(rows, tmp_path)}
    twin, dense = comps["bits per byte, recovered vs not"], comps["bits per byte, recovered vs dense"]
    assert (twin["a"], twin["b"]) == ("base4-drop1-lora", "base4-drop1") and twin["distinguishable"]
    assert (dense["a"], dense["b"]) == ("base4-drop1-lora", "base4") and dense["distinguishable"]
    rows[2]["bits_per_byte"] = mean_ci([2.55, 2.66, 2.61])  # recovery within the seeds' noise
    twin = next(c for c in comparisons(rows, tmp_path) if c["what"] == "bits per byte, recovered vs not")
    assert not twin["distinguishable"]


def test_a_gated_side_by_side_states_no_latency_verdict_and_a_busy_machine_is_said(tmp_path):
    from visualizations.grouped import comparisons, group_rows, sentence, write_grouped_table
    from visualizations.report import write_report

    s = _fake_study(
        tmp_path,
        bpb={"base4": [2.00, 2.01, 2.02], "ph3": [1.90, 1.91, 1.90]},
        decode={"base4": [1.0, 1.1, 0.9, 1.05, 0.95, 1.02], "ph3": [2.0, 2.2, 1.8, 2.1, 1.9, 2.04]},
    )
    side = json.loads((s.out / "side_by_side.json").read_text())
    side["gated"] = "the A/A control (the reference timed twice) came out x1.150 [1.10, 1.20] apart"
    side["control"] = {"decode_control": {"median": 1.15, "ci_low": 1.10, "ci_high": 1.20}}
    side["load"] = {"busy": True, "other_processes_cores": 1.4, "cores": 2, "load_avg_1m_before": 3.0}
    write_result(s.out / "side_by_side.json", side, CPU)
    rows = group_rows(s.out, Path(s.logs_dir))
    comps = comparisons(rows, Path(s.logs_dir))
    latency = next(c for c in comps if "ratio" in c)
    assert latency["p"] < 0.05 and not latency["distinguishable"]  # twice as slow, but the control differed
    assert "**no verdict**" in sentence(latency, 3) and "A/A control" in sentence(latency, 3)
    write_grouped_table(rows, s.out)
    report = write_report(StudyRecord.read(s.out), s.out, rows, comps, {}, [], {}).read_text()
    assert "**Busy machine**" in report and "1.40 of its 2 cores" in report and "A/A control" in report


def test_a_far_p90_does_not_stretch_the_latency_axis():
    from visualizations.plot_tradeoffs import grouped_tradeoff_figure

    def row(model, median, p90, bpb):
        return {
            "model": model,
            "per_head": False,
            "seeds_measured": 2,
            "bits_per_byte": {"mean": bpb, "ci_low": bpb - 0.01, "ci_high": bpb + 0.01},
            "decode_ms": {"median": median, "p10": 0.9 * median, "p90": p90},
        }

    fig = grouped_tradeoff_figure([row("a", 2.0, 2.4, 1.9), row("b", 4.0, 65.0, 1.8)], "decode_ms")
    (ax,) = fig.axes
    assert ax.get_xlim()[1] < 6.5  # the medians (2 and 4 ms) fill the axis, not the 65 ms p90
    assert [t.get_text() for t in ax.texts if t.get_text().startswith("p90")] == ["p90 65 →"]


def test_tradeoff_labels_never_overlap_and_the_legend_lists_only_the_families_shown():
    from visualizations.plot_tradeoffs import grouped_tradeoff_figure

    def row(name, params, bpb, kind="trained", head_layer=None):
        b = {"mean": bpb, "ci_low": bpb - 0.01, "ci_high": bpb + 0.01}
        return {
            "model": name,
            "params": params,
            "bits_per_byte": b,
            "kind": kind,
            "seeds_measured": 3,
            "head_layer": head_layer,
            "per_head": head_layer is not None,
        }

    rows = [
        row("base4", 2.0e6, 2.10),
        row("base4-int8", 2.0e6, 2.10, "compressed"),  # one place: one label
        row("base4-wanda50", 2.02e6, 2.105, "compressed"),
        row("base3", 1.6e6, 2.15),
        row("ph3", 1.62e6, 2.151, head_layer={"hidden_dim": 32, "activation": "silu"}),
    ]
    fig = grouped_tradeoff_figure(rows, "params")
    ax = fig.axes[0]
    texts = [t for t in ax.texts]
    assert sorted(t.get_text() for t in texts) == ["base3", "base4, base4-int8", "base4-wanda50", "ph3"]
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["baseline", "per-head layers", "compressed"]  # no gated attention in this study


def test_a_serving_report_says_how_busy_the_machine_was_with_the_servers_own_load_left_out():
    from serve.client import machine_load
    from visualizations.serving import load_line

    measured = {"cores": 2, "other_processes_cores": 1.5, "busy": True, "busy_threshold_cores": 0.5, "seconds": 10.0}
    quiet = machine_load(measured, server_before=100.0, server_after=112.0)  # the server used 1.2 cores of it
    assert quiet["other_processes_cores"] == pytest.approx(0.3) and not quiet["busy"]
    assert "other processes used 0.30 of its 2 cores" in load_line(quiet)
    busy = machine_load(measured | {"other_processes_cores": 1.9}, 100.0, 102.0)
    assert busy["busy"] and load_line(busy).startswith("**Busy machine**")
    foreign = machine_load(measured, None, None)  # another server: its CPU is among the others, and it says so
    assert foreign["server_counted_as_other"] and foreign["other_processes_cores"] == 1.5
    assert load_line(None) == "Machine load during the run: not measured."


def test_a_cost_axis_is_linear_over_a_narrow_range_and_reads_in_engineering_units():
    """Parameters from 1.8M to 2.1M on a log axis printed crowded ×10^6 minor labels; a narrow range is linear
    and every tick reads 1.9M, 2M ...; a wide one stays logarithmic with its decades labelled."""
    import matplotlib.pyplot as plt

    from visualizations.plot_tradeoffs import grouped_tradeoff_figure

    def row(name, params, bpb):
        b = {"mean": bpb, "ci_low": bpb - 0.01, "ci_high": bpb + 0.01}
        return {"model": name, "params": params, "bits_per_byte": b, "kind": "trained", "seeds_measured": 3}

    narrow = grouped_tradeoff_figure([row("a", 1.83e6, 2.26), row("b", 2.1e6, 2.27)], "params")
    wide = grouped_tradeoff_figure([row("a", 1.2e6, 2.3), row("b", 1.1e8, 1.9)], "params")
    for fig in (narrow, wide):
        fig.canvas.draw()
    (n,), (w,) = narrow.axes, wide.axes
    labels = [t.get_text() for t in n.get_xticklabels() if t.get_text()]
    assert n.get_xscale() == "linear" and labels and all(t.endswith("M") and "10" not in t for t in labels)
    assert w.get_xscale() == "log" and {t.get_text() for t in w.get_xticklabels()} >= {"10M", "100M"}
    plt.close(narrow)
    plt.close(wide)
