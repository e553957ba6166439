"""The study's answer as the report states it: the depth check by the paired test, the fraction of the depth gap
recovered with intervals over seeds and documents (and over seeds alone), per share of a block's cost; no fraction
of a gap that failed its check; the learning-rate check's table; ratio intervals labelled with their real level."""

import json
import math

import numpy as np
import pytest

from visualizations.grouped import _format, comparisons, crossed_fraction, depth_answers, per_seed
from visualizations.report import answer_section, tune_section

SEEDS, DOCS = 4, 30


def row(name: str, n_layers: int, nats: np.ndarray, nbytes: np.ndarray, per_head=False, params=0, flops=0.0):
    """A trained model's row as group_rows builds it, from per-seed per-document nats (seeds, documents)."""
    bpb = (nats.sum(1) / nbytes.sum() / math.log(2)).tolist()
    return {
        "model": name,
        "kind": "trained",
        "base": None,
        "n_layers": n_layers,
        "per_head": per_head,
        "head_layer": {"gate": "elementwise"} if per_head else None,
        "params": params,
        "flops_per_token": flops,
        "train_tokens": 1000,
        "runs": [],
        "run_seeds": [],
        "bits_per_byte": per_seed(bpb, list(range(SEEDS))),
        "documents": {
            "seeds": list(range(SEEDS)),
            "docs": [f"d{i}" for i in range(DOCS)],
            "index": list(range(DOCS)),
            "names": [f"doc{i}.py" for i in range(DOCS)],
            "nats": nats.tolist(),
            "tokens": np.full(nats.shape, 100).tolist(),
            "bytes": nbytes.tolist(),
        },
    }


@pytest.fixture
def study_rows():
    rng = np.random.default_rng(0)
    nbytes = rng.integers(500, 2000, DOCS).astype(float)
    base = nbytes * rng.uniform(1.0, 1.4, DOCS)  # nats per document of the deeper model
    seed_effect = rng.normal(0, 0.01, (SEEDS, 1)) * nbytes  # shared by every model of a seed (same batches)
    gap = 0.05 * nbytes * rng.uniform(0.5, 1.5, DOCS)  # what the shallower model loses, document by document
    deep = base + seed_effect + rng.normal(0, 1, (SEEDS, DOCS))
    shallow = base + gap + seed_effect + rng.normal(0, 1, (SEEDS, DOCS))
    rich = base + 0.5 * gap + seed_effect + rng.normal(0, 1, (SEEDS, DOCS))  # recovers half the gap
    return [
        row("deep3", 3, deep, nbytes, params=300, flops=3e6),
        row("plain2", 2, shallow, nbytes, params=200, flops=2e6),
        row("rich2", 2, rich, nbytes, per_head=True, params=225, flops=2.5e6),
    ]


def test_the_fraction_of_the_gap_comes_with_intervals_over_seeds_and_documents(study_rows, tmp_path):
    (answer,) = depth_answers(study_rows)
    assert answer["fraction"] == pytest.approx(0.5, abs=0.05)
    crossed = answer["crossed"]
    assert crossed["seeds"] == SEEDS and crossed["documents"] == DOCS
    assert crossed["ci_low"] < answer["fraction"] < crossed["ci_high"] and crossed["ci_high"] - crossed["ci_low"] < 0.5
    assert answer["ci_low"] < answer["fraction"] < answer["ci_high"]  # Fieller's, over seeds alone
    # a quarter of a block's parameters and half of its FLOPs spent for half the gap
    assert answer["params_share"] == pytest.approx(0.25) and answer["flops_per_token_share"] == pytest.approx(0.5)
    assert answer["fraction_per_params_share"] == pytest.approx(answer["fraction"] / 0.25)
    comps = comparisons(study_rows, tmp_path)
    check = next(c for c in comps if c.get("depth_check"))
    # seeds share their batches: the paired test; its power is the paired one
    assert check["test"] == "paired t" and check["n"] == SEEDS and check["power"]["paired"]
    assert check["crossed"]["ci_high"] < 0  # deep - shallow: below zero over seeds and documents
    text = "\n".join(answer_section([answer], comps, study_rows))
    assert "**distinguishably better**" in text and f"paired t-test over {SEEDS} seeds" in text
    # the depth check states its difference with the sign the comparisons use (deeper minus shallower)
    assert f"deep3 minus plain2 = {check['diff']:+.4f} bits per byte" in text
    assert f"[{check['crossed']['ci_low']:+.4f}, {check['crossed']['ci_high']:+.4f}]" in text
    assert "[95%, seeds and documents]" in text and "recovers **part** of the gap" in text
    assert "after the adjustment over the report's comparisons at worst" in text


def test_no_fraction_is_printed_of_a_gap_that_failed_its_depth_check(study_rows, tmp_path):
    deep, shallow, rich = study_rows
    values = [v + 1e-4 for v in shallow["bits_per_byte"]["values"]]
    deep["bits_per_byte"] = shallow["bits_per_byte"] | {"values": values}
    deep["documents"] = shallow["documents"]
    answers = depth_answers(study_rows)
    text = "\n".join(answer_section(answers, comparisons(study_rows, tmp_path), study_rows))
    assert "**not distinguishably better**" in text and "no fraction of its gap is stated" in text
    assert "fraction of the depth gap recovered" not in text and "recovers" not in text


def test_the_crossed_fraction_is_unbounded_when_the_gaps_interval_reaches_zero(study_rows):
    deep, shallow, rich = study_rows
    noisy = np.asarray(shallow["documents"]["nats"]) + np.random.default_rng(1).normal(0, 400, (SEEDS, DOCS))
    shallow["documents"] = shallow["documents"] | {"nats": noisy.tolist()}
    f = crossed_fraction(deep, shallow, rich)
    assert f["gap_ci"][0] <= 0 and f["ci_low"] is None and "reaches zero" in f["reason"]


def test_the_learning_rate_table_reads_the_check(tmp_path):
    record = {
        "grid": [1e-3, 2e-3, 4e-3],
        "seeds": 2,
        "tail": 0.1,
        "runs": {
            "m": {
                "chosen": 2e-3,
                "grid": [1e-3, 2e-3, 4e-3, 8e-3],
                "rates": [
                    {"lr": 1e-3, "tail_losses": [3.1, 3.2], "mean": 3.15},
                    {"lr": 2e-3, "tail_losses": [3.0, 3.05], "mean": 3.025},
                    {"lr": 4e-3, "tail_losses": [3.2, 3.1], "mean": 3.15},
                    {"lr": 8e-3, "tail_losses": [None, 3.5], "mean": None},
                ],
            }
        },
    }
    (tmp_path / "tune.json").write_text(json.dumps(record))
    text = "\n".join(tune_section(tmp_path))
    assert "| m | 3.1500 | **3.0250** | 3.1500 | diverged | 0.002 |" in text
    assert "no held-out text was read to choose" in text
    (tmp_path / "tune.json").write_text("{")
    assert "is damaged" in "\n".join(tune_section(tmp_path))


def test_a_ratios_interval_says_its_level():
    ratio = {"median": 1.02, "ci_low": 0.99, "ci_high": 1.05, "confidence": 1 - 0.05 / 12}
    assert _format("decode_ratio", ratio) == "x1.020 [0.990, 1.050] (99.58%)"
    assert "level not recorded" in _format("decode_ratio", ratio | {"confidence": None})


def test_the_documents_written_rescore_every_model_and_seed_and_any_subset(study_rows, tmp_path):
    import csv

    from visualizations.grouped import write_documents

    write_documents(study_rows, tmp_path)
    docs = list(csv.DictReader((tmp_path / "documents.csv").open()))
    assert [d["name"] for d in docs] == [f"doc{i}.py" for i in range(DOCS)]
    nbytes = {d["sha256"]: float(d["bytes"]) for d in docs}
    rows = list(csv.DictReader((tmp_path / "document_nats.csv").open()))
    assert len(rows) == len(study_rows) * SEEDS * DOCS
    for r in study_rows:
        for k in range(SEEDS):
            mine = {d["sha256"]: float(d["nats"]) for d in rows if d["model"] == r["model"] and int(d["seed"]) == k}
            whole = sum(mine.values()) / math.log(2) / sum(nbytes.values())
            assert whole == pytest.approx(r["bits_per_byte"]["values"][k], rel=1e-12)
            first = list(mine)[:3]  # a subset: its own bits per byte, from the same figures
            subset = sum(mine[d] for d in first) / math.log(2) / sum(nbytes[d] for d in first)
            direct = (
                np.array(r["documents"]["nats"])[k, :3].sum()
                / math.log(2)
                / np.array(r["documents"]["bytes"])[:3].sum()
            )
            assert subset == pytest.approx(direct, rel=1e-12)
    assert write_documents([{"model": "m", "documents": None}], tmp_path / "none") == []


def test_the_rule_for_leaving_a_model_out_is_applied_to_the_checks_runs(tmp_path):
    import shutil
    import statistics
    from pathlib import Path

    from common.stats import mdd_paired

    # the committed rate check of study_cpu3: the rule keeps every model (checked by hand in its progress page)
    shutil.copy(Path(__file__).parent.parent / "docs/results/study_cpu3/tune.json", tmp_path / "tune.json")

    def trained(name, layers, per_head):
        return {"model": name, "kind": "trained", "n_layers": layers, "per_head": per_head}

    rows = [trained("cpu3_baseline_3l", 3, False), trained("cpu3_baseline_2l", 2, False)]
    rows += [trained(f"cpu3_{n}_2l", 2, True) for n in ("perhead", "perhead512", "gated", "headnorm")]
    rows.append({"model": "cpu3_baseline_3l-drop1", "kind": "compressed", "n_layers": 2, "per_head": False})
    text = "\n".join(tune_section(tmp_path, rows))
    assert "| cpu3_headnorm_2l | cpu3_baseline_2l | +0.1978 | 0.2732 | kept |" in text
    assert "| cpu3_gated_2l | cpu3_baseline_2l | -0.0401 | 0.1043 | kept |" in text
    assert "left out by the rule" not in text and "cpu3_baseline_3l |" not in text.split("Leaving a model out")[1]
    # a model worse by more than the check could detect is marked, with the paired MDD of its differences
    record = json.loads((tmp_path / "tune.json").read_text())
    record["runs"]["cpu3_headnorm_2l"]["rates"][1]["tail_losses"] = [2.9777, 2.9905]  # chosen 2e-3: +0.40, +0.39
    (tmp_path / "tune.json").write_text(json.dumps(record))
    text = "\n".join(tune_section(tmp_path, rows))
    plain = next(r["tail_losses"] for r in record["runs"]["cpu3_baseline_2l"]["rates"] if r["lr"] == 2e-3)
    diffs = [2.9777 - plain[0], 2.9905 - plain[1]]
    gap, expected = statistics.fmean(diffs), mdd_paired(statistics.stdev(diffs), 2)
    assert gap > expected
    assert f"| cpu3_headnorm_2l | cpu3_baseline_2l | {gap:+.4f} | {expected:.4f} | **left out by the rule** |" in text
    assert "Leaving a model out" not in "\n".join(tune_section(tmp_path))  # without the rows: no rule applied
